# Example board glue for the qemuarm64 example, active only in the update-agent-example distro
# (conf/distro/update-agent-example.conf): U-Boot keeps its environment in uboot.env on the boot
# partition, where fw_setenv reaches it.
FILESEXTRAPATHS:prepend:update-agent-example := "${THISDIR}/files:"
SRC_URI:append:update-agent-example = " file://update-agent-env-in-fat.cfg"
