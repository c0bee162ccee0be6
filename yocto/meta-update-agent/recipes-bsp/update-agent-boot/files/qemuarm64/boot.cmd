# update-agent: A/B slot selection for U-Boot.
# Build the script image with:  mkimage -A arm64 -T script -C none -d uboot-boot.cmd boot.scr
#
# Variables (RAUC's, so a board set up for RAUC keeps working), written by update-agent through
# fw_setenv:
#   BOOT_ORDER     bootnames in the order to try, e.g. "B A"
#   BOOT_<x>_LEFT  tries slot x has left, in hex without 0x (as setexpr writes it)
#
# Rules. tests/common/boot_sim.rs simulates exactly these in the tests; change both together.
#   1. An unset BOOT_ORDER is "A B"; an unset BOOT_<x>_LEFT is 3 (update-agent's
#      `bootloader.attempts` must be the same number).
#   2. Walk BOOT_ORDER and take the first known slot whose BOOT_<x>_LEFT is above 0; count one
#      try off it, save the environment, boot it. Words that are not A or B are passed over.
#   3. If no slot has a try left, give every slot 3 again, save, and reset the board: the next
#      start walks BOOT_ORDER afresh (RAUC's behaviour). A slot that was marked bad is no longer
#      in BOOT_ORDER, so it is not tried again.
#
# Lines marked BOARD are examples for one board and must be adapted.

test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv ua_slot
# Quoted as in RAUC's documented script: U-Boot's hush splits it into words all the same.
for ua_word in "${BOOT_ORDER}"; do
  # `0x` because setexpr stores hex and `test` reads plain digits as decimal.
  if test -z "${ua_slot}" && test "${ua_word}" = "A" && test 0x${BOOT_A_LEFT} -gt 0; then
    setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1
    setenv ua_slot A
    setenv ua_part 2                                    # BOARD: partition of slot A
  fi
  if test -z "${ua_slot}" && test "${ua_word}" = "B" && test 0x${BOOT_B_LEFT} -gt 0; then
    setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1
    setenv ua_slot B
    setenv ua_part 3                                    # BOARD: partition of slot B
  fi
done

if test -n "${ua_slot}"; then
  saveenv
else
  echo "update-agent: no slot has a try left; every slot gets 3 again"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  saveenv
  reset
fi

echo "update-agent: booting slot ${ua_slot}, ${BOOT_A_LEFT}/${BOOT_B_LEFT} tries left (A/B)"
# rauc.slot= tells the running system which slot it was booted from.
setenv bootargs "console=ttyAMA0 root=/dev/vda${ua_part} rootwait ro rauc.slot=${ua_slot}"   # BOARD: qemuarm64
load virtio 0:${ua_part} ${kernel_addr_r} /boot/Image                                # BOARD: qemuarm64
# QEMU hands U-Boot its device tree, kept at fdtcontroladdr: nothing to load     # BOARD: qemuarm64
booti ${kernel_addr_r} - ${fdtcontroladdr}                                           # BOARD: qemuarm64

# The kernel did not start. The try is already counted: reset and let the counters decide.
reset
