SUMMARY = "update-agent configuration and release signing trust anchor"
DESCRIPTION = "The device's /etc/update-agent/agent.toml and the public keys that release \
signatures are checked against, installed read-only under /usr. Override both from a bbappend \
in your own layer."
HOMEPAGE = "https://example.invalid/update-agent"
SECTION = "admin"
# This layer's own files, under update-agent's license.
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# In your layer, recipes-core/update-agent/update-agent-conf_%.bbappend:
#     FILESEXTRAPATHS:prepend := "${THISDIR}/files:"
#     UPDATE_AGENT_KEYS = "release-2026.pub release-2027.pub"
# with files/agent.toml (your device's config) and the listed SPKI PEM public keys beside it.
# Keys are public: never put a private key in a layer.
UPDATE_AGENT_CONFIG ??= "agent.toml"
UPDATE_AGENT_KEYS ??= "example-release-key.pub"

# The example key's private half was thrown away when it was made (`update-agent keygen`):
# an image that still trusts only it accepts no release at all.
UPDATE_AGENT_EXAMPLE_KEY_SHA256 = "43c69b4c312aa2bf61ce7f9ea2b7a7bd6846e73cb6182ac203479a295e79f356"

SRC_URI = "file://${UPDATE_AGENT_CONFIG} ${@' '.join('file://' + k for k in d.getVar('UPDATE_AGENT_KEYS').split())}"

# A file:// only recipe: scarthgap unpacks into WORKDIR, styhead and later into UNPACKDIR
# (which scarthgap does not define).
UPDATE_AGENT_FILESDIR = "${@d.getVar('UNPACKDIR') or d.getVar('WORKDIR')}"
S = "${UPDATE_AGENT_FILESDIR}"

INHIBIT_DEFAULT_DEPS = "1"
do_configure[noexec] = "1"
do_compile[noexec] = "1"

do_install() {
    if grep -q "^compatible = \"acme-gateway-v1\"" ${UPDATE_AGENT_FILESDIR}/${UPDATE_AGENT_CONFIG}; then
        bbwarn "update-agent-conf: ${UPDATE_AGENT_CONFIG} is the example config (compatible = acme-gateway-v1): provide your device's in a bbappend"
    fi
    install -d ${D}${sysconfdir}/update-agent
    install -m 0644 ${UPDATE_AGENT_FILESDIR}/${UPDATE_AGENT_CONFIG} ${D}${sysconfdir}/update-agent/agent.toml

    # The trust anchor: owned by root, not writable by group or others, on the read-only root
    # filesystem. update-agent refuses an anchor that is anything else.
    install -d -m 0755 ${D}${datadir}/update-agent/keys.d
    for key in ${UPDATE_AGENT_KEYS}; do
        if [ "$(sha256sum ${UPDATE_AGENT_FILESDIR}/$key | cut -d' ' -f1)" = "${UPDATE_AGENT_EXAMPLE_KEY_SHA256}" ]; then
            bbwarn "update-agent-conf: $key is the layer's example key, which signs nothing: set UPDATE_AGENT_KEYS to your release signing keys in a bbappend"
        fi
        install -m 0644 ${UPDATE_AGENT_FILESDIR}/$key ${D}${datadir}/update-agent/keys.d/
    done
}

FILES:${PN} += "${sysconfdir}/update-agent ${datadir}/update-agent"
CONFFILES:${PN} = "${sysconfdir}/update-agent/agent.toml"
