# Example board glue, active only in the update-agent-example distro: the mounts of
# wic/update-agent-ab-*.wks, in the fstab of every rootfs image, so that a slot written by an
# update mounts them as the first image did (wic would write them into slot A's copy only).
do_install:append:update-agent-example() {
    printf 'LABEL=boot\t/boot\tvfat\tdefaults\t0\t0\n' >> ${D}${sysconfdir}/fstab
    printf 'LABEL=ua-state\t/var/lib/update-agent\text4\tdefaults\t0\t2\n' >> ${D}${sysconfdir}/fstab
}
