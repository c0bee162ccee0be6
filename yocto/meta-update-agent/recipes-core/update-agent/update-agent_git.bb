SUMMARY = "A/B update agent for embedded Linux gateways"
DESCRIPTION = "Verifies signed releases against a read-only trust anchor, streams the image \
into the inactive slot of an A/B pair, switches U-Boot or GRUB to try it once, and commits or \
rolls back after the trial boot. Bootloader variables are RAUC-compatible."
HOMEPAGE = "https://example.invalid/update-agent"
SECTION = "admin"
LICENSE = "Apache-2.0"
# The repository has no LICENSE file; Cargo.toml's license field is what is checked.
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=7;endline=7;md5=2507bd5f0713f05419cd2f22fa06fe62"

# The source. UPDATE_AGENT_GIT_URI is the project's repository; point it at your mirror. SRCREV
# is a placeholder on purpose: set it (here or in a bbappend) to the commit you ship, and
# regenerate update-agent-crates.inc from that commit's Cargo.lock with
# scripts/gen-crates-inc (CI keeps the committed .inc in step with Cargo.lock).
PV = "0.1.0+git"
UPDATE_AGENT_GIT_URI ??= "git://example.invalid/update-agent.git;protocol=https"
SRC_URI = "${UPDATE_AGENT_GIT_URI};branch=main;destsuffix=${BP}"
SRCREV = "0000000000000000000000000000000000000000"

# Every crate of Cargo.lock as crate://, with its checksum: fetched in do_fetch, so the build
# (`cargo build --frozen`) never touches the network.
require update-agent-crates.inc

# No `S =`: the git checkout unpacks to ${BP}, which is S's default on every supported series
# (scarthgap: ${WORKDIR}/${BP}; whinlatter and later: ${UNPACKDIR}/${BP}).

inherit cargo cargo-update-recipe-crates systemd useradd

# Rust 1.89 or newer is needed (edition 2024, zbus 6): whinlatter or later, or scarthgap with a
# newer Rust from another layer. With an older one, cargo stops in do_compile saying which
# version the package requires.

# The `demo` feature (an embedded MQTT broker and an image server for trying the agent on a
# workstation) and the `operator` feature (keygen, release create/sign/publish, monitor: the
# operator's workstation tools) stay out of device images; cargo.bbclass passes these arguments
# to cargo build.
PACKAGECONFIG_CONFARGS = "--no-default-features"

# build.rs links glibc targets with `-z pack-relative-relocs` (RELR relocations, about 200 KiB
# less): the image's glibc must be 2.36 or newer, as in every release with Rust 1.89. It links
# release builds without unwind tables (linker/no-unwind-tables.ld, for GNU ld and lld alike;
# the release profile aborts on panic): gdb on the device walks stacks without CFI.

# x86-64: LLVM's machine outliner, which it runs by default at opt-level "z" on aarch64 and arm
# but on x86-64 only when asked (about 100 KiB less). The project's .cargo/config.toml asks for
# it, but Yocto's exported RUSTFLAGS replace that file's; scripts/check-boot-glue checks that
# these flags are the same as the file's.
RUSTFLAGS:append:x86-64 = " -Cllvm-args=-enable-machine-outliner -Cllvm-args=-outliner-benefit-threshold=16"

# Cargo.toml's [profile.release] has no `strip`: the binary is installed with its symbols so
# that bitbake splits them into ${PN}-dbg and strips it itself; a binary stripped by cargo would
# trip the already-stripped QA check and lose the debug package.

# The bootloader tool the agent calls: libubootenv's fw_printenv/fw_setenv for U-Boot,
# grub-editenv for GRUB. Chosen from the image's bootloader; set UPDATE_AGENT_BOOTLOADER_RDEPENDS
# yourself when that guess is wrong (e.g. U-Boot not built by this build).
def update_agent_bootloader_rdepends(d):
    provider = d.getVar("PREFERRED_PROVIDER_virtual/bootloader") or ""
    efi = d.getVar("EFI_PROVIDER") or ""
    if "grub" in provider or efi.startswith("grub"):
        return "grub-editenv"
    if "u-boot" in provider:
        return "libubootenv-bin"
    return ""

UPDATE_AGENT_BOOTLOADER_RDEPENDS ??= "${@update_agent_bootloader_rdepends(d)}"

# The unprivileged user of the daemon and the boot check, created at build time: a read-only
# rootfs cannot add users at boot. Same definition as systemd/sysusers.d/update-agent.conf. Its
# group may connect to the privileged installer's socket.
USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir / --no-create-home --shell /sbin/nologin --user-group update-agent"
# The people allowed to postpone, resume, switch automatic install and install now over D-Bus
# (with root): the bus policy file and the agent's `[dbus] admin_group` name this group.
GROUPADD_PARAM:${PN} = "--system update-admin"

# The privileged installer is socket-activated: enabling its socket is enough (the service
# names the socket with Also=).
SYSTEMD_SERVICE:${PN} = "update-agent.service update-agent-boot-check.service update-agent-installer.socket"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/update-agent.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/update-agent-boot-check.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/update-agent-installer.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/update-agent-installer.socket ${D}${systemd_system_unitdir}/
    sed -i -e 's#/usr/bin/update-agent #${bindir}/update-agent #' \
        ${D}${systemd_system_unitdir}/update-agent.service \
        ${D}${systemd_system_unitdir}/update-agent-boot-check.service \
        ${D}${systemd_system_unitdir}/update-agent-installer.service

    install -d ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/sysusers.d/update-agent.conf ${D}${nonarch_libdir}/sysusers.d/
    install -m 0644 ${S}/systemd/tmpfiles.d/update-agent.conf ${D}${nonarch_libdir}/tmpfiles.d/

    # D-Bus: the bus policy (who may own and call org.updateagent.Agent1; it comes with the
    # D-Bus service) and the activation file.
    install -d ${D}${datadir}/dbus-1/system.d ${D}${datadir}/dbus-1/system-services
    if [ -e ${S}/systemd/dbus/org.updateagent.Agent1.conf ]; then
        install -m 0644 ${S}/systemd/dbus/org.updateagent.Agent1.conf ${D}${datadir}/dbus-1/system.d/
    else
        bbwarn "update-agent: this source has no D-Bus policy yet; the daemon cannot own its bus name"
    fi
    install -m 0644 ${S}/systemd/dbus/org.updateagent.Agent1.service ${D}${datadir}/dbus-1/system-services/

    # The state directories: the installer's (root's, the persistent partition's mount point)
    # and the agent's inside it (the daemon's user's). The units' StateDirectory= and tmpfiles.d
    # create them at boot too, for a partition that starts empty.
    install -d -m 0755 ${D}${localstatedir}/lib/update-agent
    install -d -m 0700 -o update-agent -g update-agent ${D}${localstatedir}/lib/update-agent/daemon
}

FILES:${PN} += "\
    ${systemd_system_unitdir} \
    ${nonarch_libdir}/sysusers.d \
    ${nonarch_libdir}/tmpfiles.d \
    ${datadir}/dbus-1 \
    ${localstatedir}/lib/update-agent \
"
# wrynose names the D-Bus implementation VIRTUAL-RUNTIME_dbus; scarthgap does not.
VIRTUAL-RUNTIME_dbus ??= "dbus"
RDEPENDS:${PN} += "${UPDATE_AGENT_BOOTLOADER_RDEPENDS} ${VIRTUAL-RUNTIME_dbus} update-agent-conf"
