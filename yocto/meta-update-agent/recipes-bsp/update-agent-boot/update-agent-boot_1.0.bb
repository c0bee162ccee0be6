SUMMARY = "Example bootloader glue for update-agent on QEMU machines"
DESCRIPTION = "qemuarm64: the U-Boot boot script (RAUC-compatible BOOT_ORDER and BOOT_x_LEFT) \
as boot.scr, and /etc/fw_env.config. qemux86-64: the initial grubenv for the GRUB script \
(ORDER, x_OK, x_TRY). Copy and adapt it for a real board."
HOMEPAGE = "https://example.invalid/update-agent"
SECTION = "bootloaders"
# This layer's own files, under update-agent's license.
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# The boot logic is update-agent's config/boot/uboot-boot.cmd and config/boot/grub.cfg; the copies
# here (files/qemuarm64/boot.cmd, wic/update-agent-qemux86-64-grub.cfg) differ only in the lines
# marked BOARD, which scripts/check-boot-glue checks in update-agent's CI.
DEPENDS:qemuarm64 = "u-boot-tools-native"
DEPENDS:qemux86-64 = "grub-native"

SRC_URI:qemuarm64 = "file://boot.cmd file://fw_env.config"
SRC_URI:qemux86-64 = ""

UPDATE_AGENT_FILESDIR = "${@d.getVar('UNPACKDIR') or d.getVar('WORKDIR')}"
S = "${UPDATE_AGENT_FILESDIR}"
B = "${WORKDIR}/build"

COMPATIBLE_MACHINE = "^(qemuarm64|qemux86-64)$"
PACKAGE_ARCH = "${MACHINE_ARCH}"

inherit deploy

do_configure[noexec] = "1"

do_compile:qemuarm64() {
    mkimage -A arm64 -T script -C none -n "update-agent A/B" \
        -d ${UPDATE_AGENT_FILESDIR}/boot.cmd ${B}/boot.scr
}

# Slot A holds the first image and is good; slot B is empty until the first update writes it.
# An unset variable means what the script's rule 1 says, so a missing grubenv boots A as well.
do_compile:qemux86-64() {
    rm -f ${B}/grubenv
    grub-editenv ${B}/grubenv create
    grub-editenv ${B}/grubenv set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0
}

do_install:qemuarm64() {
    install -d ${D}${sysconfdir}
    install -m 0644 ${UPDATE_AGENT_FILESDIR}/fw_env.config ${D}${sysconfdir}/fw_env.config
}

do_install:qemux86-64() {
    :
}

# To the image's boot partition: IMAGE_BOOT_FILES (U-Boot) or IMAGE_EFI_BOOT_FILES (GRUB).
do_deploy:qemuarm64() {
    install -m 0644 ${B}/boot.scr ${DEPLOYDIR}/boot.scr
}

do_deploy:qemux86-64() {
    install -m 0644 ${B}/grubenv ${DEPLOYDIR}/grubenv
}

addtask deploy after do_compile before do_build

FILES:${PN}:append:qemuarm64 = " ${sysconfdir}/fw_env.config"
ALLOW_EMPTY:${PN} = "1"
CONFFILES:${PN}:append:qemuarm64 = " ${sysconfdir}/fw_env.config"
