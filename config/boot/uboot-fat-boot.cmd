# update-agent: A/B slot selection for U-Boot builds without `setexpr` and `saveenv`, with the
# environment in a file on a FAT partition.
# Build the script image with:  mkimage -A arm64 -T script -C none -d uboot-fat-boot.cmd boot.scr
#
# Same variables, same rules as uboot-boot.cmd (RAUC's BOOT_ORDER and BOOT_<x>_LEFT, written by
# update-agent through fw_setenv); only the means differ, for U-Boot builds that lack those two
# commands (Debian's qemu-x86 U-Boot, which the system test boots, is one):
#   - The environment is a file on a FAT partition, in the layout CONFIG_ENV_IS_IN_FAT keeps: a
#     CRC32, then the NAME=value strings, no redundant copy. Linux reaches it with libubootenv's
#     fw_printenv/fw_setenv, through an fw_env.config line naming the file on the mounted
#     partition and its size. This script loads it with `fatload` + `env import -c` and saves
#     it with `env export -c` + `fatwrite`, of its own three variables only (as grub.cfg's
#     load_env): the file cannot set bootcmd, bootargs or anything else, and U-Boot's defaults
#     do not end up in it.
#   - A try is counted off by comparison instead of `setexpr`: BOOT_<x>_LEFT is compared with
#     the hex digits 1 to f and set to the digit below. update-agent writes the counter as
#     `bootloader.attempts` in lowercase hex (and 0 for a bad slot), so keep attempts at 15 or
#     less with this script: a counter it does not recognise counts as no try left.
#
# Rules. src/bootloader/simulator.rs simulates exactly these in the tests; change both together.
#   1. An unset BOOT_ORDER is "A B"; an unset BOOT_<x>_LEFT is 3 (update-agent's
#      `bootloader.attempts` must be the same number).
#   2. Walk BOOT_ORDER and take the first known slot whose BOOT_<x>_LEFT is above 0; count one
#      try off it, save the environment, boot it. Words that are not A or B are passed over.
#   3. If no slot has a try left, give every slot 3 again, save, and reset the board: the next
#      start walks BOOT_ORDER afresh (RAUC's behaviour). A slot that was marked bad is no longer
#      in BOOT_ORDER, so it is not tried again.
#
# Lines marked BOARD are examples for one board and must be adapted.

setenv ua_env_dev "mmc 0:1"                             # BOARD: the FAT partition of the environment
setenv ua_env_size 0x40000                              # BOARD: its size, as in fw_env.config
setenv ua_env_file uboot.env

# A missing or corrupt file (bad CRC) leaves the variables unset: rule 1 fills them in.
setenv BOOT_ORDER
setenv BOOT_A_LEFT
setenv BOOT_B_LEFT
if fatload ${ua_env_dev} ${loadaddr} ${ua_env_file}; then
  env import -c ${loadaddr} ${ua_env_size} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
fi

test -n "${BOOT_ORDER}" || setenv BOOT_ORDER "A B"
test -n "${BOOT_A_LEFT}" || setenv BOOT_A_LEFT 3
test -n "${BOOT_B_LEFT}" || setenv BOOT_B_LEFT 3

setenv ua_slot
# Quoted as in RAUC's documented script: U-Boot's hush splits it into words all the same.
for ua_word in "${BOOT_ORDER}"; do
  # ua_less walks the hex digits one behind ua_digit: where ua_digit is the counter, ua_less is
  # the counter minus one. 0, or anything but 1 to f, matches nothing: no try left.
  setenv ua_less
  for ua_digit in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do
    if test -z "${ua_slot}" && test -n "${ua_less}" && test "${ua_word}" = "A" && test "${BOOT_A_LEFT}" = "${ua_digit}"; then
      setenv BOOT_A_LEFT ${ua_less}
      setenv ua_slot A
      setenv ua_part 2                                  # BOARD: partition of slot A
    fi
    if test -z "${ua_slot}" && test -n "${ua_less}" && test "${ua_word}" = "B" && test "${BOOT_B_LEFT}" = "${ua_digit}"; then
      setenv BOOT_B_LEFT ${ua_less}
      setenv ua_slot B
      setenv ua_part 3                                  # BOARD: partition of slot B
    fi
    setenv ua_less ${ua_digit}
  done
done

if test -n "${ua_slot}"; then
  env export -c -s ${ua_env_size} ${loadaddr} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
  fatwrite ${ua_env_dev} ${loadaddr} ${ua_env_file} ${ua_env_size}
else
  echo "update-agent: no slot has a try left; every slot gets 3 again"
  setenv BOOT_A_LEFT 3
  setenv BOOT_B_LEFT 3
  env export -c -s ${ua_env_size} ${loadaddr} BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
  fatwrite ${ua_env_dev} ${loadaddr} ${ua_env_file} ${ua_env_size}
  reset
fi

echo "update-agent: booting slot ${ua_slot}, ${BOOT_A_LEFT}/${BOOT_B_LEFT} tries left (A/B)"
# rauc.slot= tells the running system which slot it was booted from.
setenv bootargs "${bootargs} root=/dev/mmcblk0p${ua_part} rootwait rauc.slot=${ua_slot}"   # BOARD
load mmc 0:${ua_part} ${kernel_addr_r} /boot/Image                                   # BOARD
load mmc 0:${ua_part} ${fdt_addr_r} /boot/${fdtfile}                                 # BOARD
booti ${kernel_addr_r} - ${fdt_addr_r}                                               # BOARD

# The kernel did not start. The try is already counted: reset and let the counters decide.
reset
