//! `update-agent conformance`, run as on a device: the example config (`config/agent.toml`,
//! only its paths moved into a temporary directory) with its trust anchor on a read-only
//! tmpfs in a private mount namespace (as `tests/trust_anchor.rs` makes it; these tests run as
//! root), each weakened configuration against it, the self-test on a good device and on one
//! whose anchor is writable, the CycloneDX output against the official schema, the test-unit
//! map against this repository's tests, and the live evidence from a real install cycle.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use ed25519_dalek::pkcs8::EncodePublicKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use serde_json::{Value, json};
use update_agent::conformance::{standard, test_map};

/// The example config's product, which the self-test's release must name.
const EXAMPLE_COMPATIBLE: &str = "acme-gateway-v1";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The public half of `seed`'s key, as the integrator puts it into the anchor.
fn write_pub(dir: &Path, seed: u8) {
    fs::create_dir_all(dir).unwrap();
    let pem = key(seed)
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    fs::write(dir.join(format!("key-{seed}.pub")), pem).unwrap();
}

/// A release for the example product, signed by `seed`, whose signing time is `created`.
fn release(dir: &Path, seed: u8, created: &str) -> PathBuf {
    let manifest = json!({
        "format": 1,
        "version": "2026.06.1",
        "security_version": 5,
        "compatible": EXAMPLE_COMPATIBLE,
        "created": created,
        "security": true,
        "advisory": "Fixes CVE-2026-0001.",
        "images": {"rootfs": {
            "url": "https://updates.example.com/rootfs.img",
            "size": 1048576,
            "sha256": IMAGE_SHA256
        }}
    });
    let path = dir.join("release.json");
    fs::write(&path, signed(&to_bytes(&manifest), &[seed])).unwrap();
    path
}

/// A device in a temporary directory, configured by the example config: the anchor (key A)
/// is mounted read-only at `anchor` when a run happens in the namespace.
struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    fn new() -> Device {
        let dir = tempfile::tempdir().unwrap();
        write_pub(&dir.path().join("anchor-source"), KEY_A);
        fs::create_dir(dir.path().join("anchor")).unwrap();
        fs::create_dir(dir.path().join("out")).unwrap();
        Device { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The example config with its anchor and state directory moved here, changed by `edit`
    /// (each edit must apply: the example config is what is tested).
    fn config(&self, name: &str, edits: &[(&str, &str)]) -> PathBuf {
        let mut config = fs::read_to_string(repo().join("config/agent.toml")).unwrap();
        let moved = [
            (
                "keys_dir = \"/usr/share/update-agent/keys.d\"",
                format!("keys_dir = \"{}\"", self.path("anchor").display()),
            ),
            (
                "state_dir = \"/var/lib/update-agent/daemon\"",
                format!("state_dir = \"{}\"", self.path("state").display()),
            ),
        ];
        for (from, to) in moved
            .iter()
            .map(|(f, t)| (*f, t.as_str()))
            .chain(edits.iter().copied())
        {
            assert!(
                config.contains(from),
                "config/agent.toml no longer has {from:?}"
            );
            config = config.replace(from, to);
        }
        let path = self.path(&format!("{name}.toml"));
        fs::write(&path, config).unwrap();
        path
    }

    /// Runs `update-agent conformance ARGS` for each `(name, args)` inside a private mount
    /// namespace where the anchor is a root-owned read-only tmpfs holding key A.
    fn run_read_only(&self, runs: &[(&str, Vec<String>)]) -> BTreeMap<String, Output> {
        let out = self.path("out");
        let mut script = String::from(
            "set -e\nmount --make-rprivate /\nmount -t tmpfs -o mode=0755,size=1m update-agent-conformance-anchor \"$1\"\ncp \"$2\"/*.pub \"$1\"/\nchown root:root \"$1\"/*\nchmod 0644 \"$1\"/*\nmount -o remount,ro \"$1\"\nset +e\n",
        );
        for (name, args) in runs {
            let args: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
            script.push_str(&format!(
                "'{BIN}' conformance {} >'{o}/{name}.out' 2>'{o}/{name}.err'; echo $? >'{o}/{name}.rc'\n",
                args.join(" "),
                o = out.display()
            ));
        }
        let status = in_mount_namespace(&script)
            .arg(self.path("anchor"))
            .arg(self.path("anchor-source"))
            .status()
            .expect("cannot run unshare (util-linux); this test needs it and root");
        assert!(
            status.success(),
            "the namespace set-up failed ({status}); this test needs root for unshare -m and mount"
        );
        runs.iter()
            .map(|(name, _)| {
                let read = |ext: &str| fs::read(out.join(format!("{name}.{ext}"))).unwrap();
                let rc: i32 = text(&read("rc")).trim().parse().unwrap();
                let output = Output {
                    status: std::os::unix::process::ExitStatusExt::from_raw(rc << 8),
                    stdout: read("out"),
                    stderr: read("err"),
                };
                (name.to_string(), output)
            })
            .collect()
    }
}

fn args(config: &Path, format: &str, extra: &[&Path]) -> Vec<String> {
    let mut args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--format".to_string(),
        format.to_string(),
    ];
    for path in extra {
        args.push("--release".into());
        args.push(path.display().to_string());
    }
    args
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\nstderr:\n{}",
            text(&output.stdout),
            text(&output.stderr)
        )
    })
}

fn statuses(report: &Value) -> Vec<String> {
    report["provisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].as_str().unwrap().to_string())
        .collect()
}

/// 5.3-1 … 5.3-16 for the example config: what the agent meets, what the manufacturer
/// declares in `[conformance]`, and the two provisions for devices that cannot be updated.
const EXAMPLE: [&str; 16] = [
    "declared",       // 5.3-1: other software (boot loader, ...) is declared
    "met",            // 5.3-2
    "met",            // 5.3-3
    "met",            // 5.3-4
    "met",            // 5.3-5
    "met",            // 5.3-6
    "met",            // 5.3-7
    "declared",       // 5.3-8: the update procedure and its time frame
    "met",            // 5.3-9
    "met",            // 5.3-10
    "declared",       // 5.3-11: how the product shows UpdateAvailable
    "declared",       // 5.3-12: how the product shows DisruptionAhead
    "declared",       // 5.3-13: where the support period is published
    "not-applicable", // 5.3-14
    "not-applicable", // 5.3-15
    "met",            // 5.3-16
];

fn expected_with(provision: &str, status: &str) -> Vec<String> {
    let index: usize = provision
        .strip_prefix("5.3-")
        .unwrap()
        .parse::<usize>()
        .unwrap()
        - 1;
    let mut expected: Vec<String> = EXAMPLE.iter().map(|s| s.to_string()).collect();
    expected[index] = status.to_string();
    expected
}

/// The member of the JSON array `array` whose `key` is `value` (there must be one).
fn member_with<'a>(array: &'a Value, key: &str, value: &str) -> &'a Value {
    let members = array.as_array().expect("an array");
    members
        .iter()
        .find(|member| member[key] == value)
        .unwrap_or_else(|| panic!("no member with {key} = {value:?} in {array}"))
}

/// `text` holds every one of `parts` (the whole text shown when one is missing).
fn assert_contains_all(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} missing from:\n{text}");
    }
}

#[test]
fn the_example_config_meets_what_it_can_and_declares_the_rest() {
    let device = Device::new();
    let config = device.config("example", &[]);
    let release = release(device.dir.path(), KEY_A, "2026-06-01T00:00:00Z");
    let outputs = device.run_read_only(&[
        ("json", args(&config, "json", &[&release])),
        ("text", args(&config, "text", &[&release])),
    ]);
    let out = &outputs["json"];
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report = json_of(out);
    assert_eq!(statuses(&report), EXAMPLE, "{report:#}");
    assert_eq!(report["findings"], json!([]));
    assert_eq!(report["anchor"]["result"], "protected");
    assert_eq!(report["anchor"]["keys"], json!([keyid_hex(KEY_A)]));
    assert_eq!(report["live"]["self_test"]["verdict"], "pass");

    // The IXIT the agent fills in: the algorithms, k of n with the anchor's key ids, checked now.
    let ixit = |ixit: &str, field: &str| -> String {
        report["ixit"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["ixit"] == ixit && f["field"] == field)
            .unwrap_or_else(|| panic!("no IXIT {ixit} / {field}"))["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let crypto = ixit("7-UpdMech", "Cryptographic Details");
    assert!(
        crypto.contains("Ed25519") && crypto.contains("1 of 1"),
        "{crypto}"
    );
    assert!(crypto.contains(&keyid_hex(KEY_A)[..16]), "{crypto}");
    assert_contains_all(&crypto, &["protected (read-only filesystem", "mutual TLS"]);
    assert!(ixit("7-UpdMech", "Update Checking").contains("every 86400 s"));
    assert!(ixit("7-UpdMech", "User Notification").contains("UpdateAvailable"));
    assert!(ixit("2-UserInfo", "Support Period").contains("2031-12-31"));
    assert!(ixit("2-UserInfo", "Model Designation").contains("ACME Gateway 1"));
    for field in [
        ("2-UserInfo", "Publication of Support Period"),
        ("6-SoftComp", "Software Components"),
        ("7-UpdMech", "Description"),
        ("7-UpdMech", "Security Guarantees"),
        ("7-UpdMech", "Initiation and Interaction"),
        ("7-UpdMech", "Configuration"),
        ("8-UpdProc", "Description"),
        ("8-UpdProc", "Time Frame"),
        ("9-ReplSup", "Hardware Replacement"),
    ] {
        assert!(!ixit(field.0, field.1).is_empty(), "{field:?}");
    }
    // The declarations are reported as such, never as verified.
    for declaration in report["declarations"].as_array().unwrap() {
        assert_eq!(declaration["verified"], false, "{declaration}");
    }
    let p13 = &report["provisions"][12];
    assert!(
        p13["evidence"][0]
            .as_str()
            .unwrap()
            .starts_with("declared by the manufacturer, not verified"),
        "{p13}"
    );
    // Every unit of every provision, with the tests that exercise it.
    let units: usize = report["provisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["test_units"].as_array().unwrap().len())
        .sum();
    assert_eq!(units, standard::units().count());
    let p2 = &report["provisions"][1];
    let unit = member_with(&p2["test_units"], "id", "5.3-2-2b");
    assert!(
        unit["tests"]
            .as_array()
            .unwrap()
            .contains(&json!("tests/install_cycle.rs::tampered_release")),
        "{unit}"
    );

    let out = &outputs["text"];
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("SUMMARY  ETSI EN 303 645 V2.1.1 5.3: 14 met"),
        "{report}"
    );
    for provision in standard::PROVISIONS {
        assert!(
            report.contains(&format!("\n{:<7} ", provision.id)),
            "{}",
            provision.id
        );
    }
    assert!(report.contains("  verdict  PASS"), "{report}");
}

/// A change of the example config that weakens one provision, and what the report must say.
struct Weakening {
    name: &'static str,
    /// Replacements in the example config's text.
    edits: &'static [(&'static str, &'static str)],
    provision: &'static str,
    status: &'static str,
    finding: &'static str,
    exit: i32,
}

#[test]
fn each_weakened_configuration_flips_its_provision_and_only_it() {
    let device = Device::new();
    let release = release(device.dir.path(), KEY_A, "2026-06-01T00:00:00Z");
    let cases = [
        Weakening {
            name: "auto-install-off",
            edits: &[
                ("auto_install = true", "auto_install = false"),
                (
                    "# justifications = [\"5.3-6: ...\"]",
                    "justifications = [\"5.3-6: the operator installs in agreed slots\"]",
                ),
            ],
            provision: "5.3-6",
            status: "not-met",
            finding: "auto-install-off",
            exit: 1,
        },
        Weakening {
            name: "plain-mqtt",
            edits: &[
                (
                    "broker = \"mqtts://mqtt.example.net:8883\"",
                    "broker = \"mqtt://mqtt.example.net:1883\"",
                ),
                ("ca_file = ", "# ca_file = "),
                ("cert_file = ", "# cert_file = "),
                ("key_file = ", "# key_file = "),
            ],
            provision: "5.3-10",
            status: "weakened",
            finding: "plain-mqtt",
            exit: 0,
        },
        Weakening {
            name: "writable-anchor-allowed",
            edits: &[(
                "insecure_writable_anchor = false",
                "insecure_writable_anchor = true",
            )],
            provision: "5.3-2",
            status: "weakened",
            finding: "writable-anchor-allowed",
            exit: 0,
        },
        Weakening {
            name: "threshold",
            edits: &[("threshold = 1", "threshold = 2")],
            provision: "5.3-2",
            status: "not-met",
            finding: "threshold-unreachable",
            exit: 1,
        },
        Weakening {
            name: "no-support-end",
            edits: &[("support_end = \"2031-12-31\"", "")],
            provision: "5.3-13",
            status: "not-met",
            finding: "no-support-end",
            exit: 1,
        },
        Weakening {
            name: "no-model",
            edits: &[("model = \"ACME Gateway 1\"", "")],
            provision: "5.3-16",
            status: "not-met",
            finding: "no-model",
            exit: 1,
        },
    ];
    let runs: Vec<(&str, Vec<String>)> = cases
        .iter()
        .map(|case| {
            let config = device.config(case.name, case.edits);
            (case.name, args(&config, "json", &[&release]))
        })
        .collect();
    let outputs = device.run_read_only(&runs);
    for case in &cases {
        let (name, provision, code) = (case.name, case.provision, case.finding);
        let out = &outputs[name];
        let report = json_of(out);
        assert_eq!(
            statuses(&report),
            expected_with(provision, case.status),
            "{name}: the whole status vector"
        );
        let findings = report["findings"].as_array().unwrap();
        assert_eq!(findings.len(), 1, "{name}: {findings:#?}");
        assert_eq!(findings[0]["code"], code, "{name}");
        assert_eq!(findings[0]["provision"], provision, "{name}");
        assert_eq!(
            out.status.code(),
            Some(case.exit),
            "{name}: {}",
            text(&out.stderr)
        );
        if case.exit == 1 {
            assert!(
                text(&out.stderr).contains(&format!("{provision} NOT MET ({code})")),
                "{name}: {}",
                text(&out.stderr)
            );
        }
    }
    // A recommendation not met carries the manufacturer's justification (TS 103 701 4-1-1).
    let off = json_of(&outputs["auto-install-off"]);
    assert_eq!(
        off["provisions"][5]["justification"],
        "declared by the manufacturer: the operator installs in agreed slots"
    );
    // Plain MQTT: the channel is weakened, the integrity of each update is not; both are said.
    let plain = json_of(&outputs["plain-mqtt"]);
    let message = plain["findings"][0]["message"].as_str().unwrap();
    assert_contains_all(
        message,
        &[
            "neither authenticated nor encrypted",
            "authenticity and integrity of every update still hold",
        ],
    );
}

#[test]
fn the_self_test_passes_on_a_good_device() {
    let device = Device::new();
    let config = device.config("example", &[]);
    let release = release(device.dir.path(), KEY_A, "2026-06-01T00:00:00Z");
    let before = fs::read(&release).unwrap();
    // The release the daemon kept of the running one, in the state directory.
    let kept = device.path("kept");
    let kept_config = device.config(
        "kept",
        &[(
            &format!("state_dir = \"{}\"", device.path("state").display()),
            &format!("state_dir = \"{}\"", kept.display()),
        )],
    );
    fs::create_dir_all(kept.join("releases")).unwrap();
    fs::copy(&release, kept.join("releases/0123.json")).unwrap();

    let outputs = device.run_read_only(&[
        ("given", args(&config, "json", &[&release])),
        ("kept", args(&kept_config, "json", &[])),
        ("none", args(&config, "json", &[])),
    ]);
    for name in ["given", "kept"] {
        let out = &outputs[name];
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stderr));
        let test = &json_of(out)["live"]["self_test"];
        assert_eq!(test["verdict"], "pass", "{name}: {test:#}");
        let checks = test["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 3, "{test:#}");
        for check in checks {
            assert_eq!(check["passed"], true, "{check}");
            assert_eq!(check["outcome"], check["expected"], "{check}");
        }
        assert_eq!(test["release"]["version"], "2026.06.1");
    }
    assert!(
        json_of(&outputs["kept"])["live"]["self_test"]["release"]["path"]
            .as_str()
            .unwrap()
            .ends_with("kept/releases/0123.json")
    );
    // Without a release it says so and how to give one; it does not pass.
    let none = json_of(&outputs["none"]);
    assert_eq!(none["live"]["self_test"]["verdict"], "not-run");
    assert!(
        none["live"]["self_test"]["reason"]
            .as_str()
            .unwrap()
            .contains("--release FILE")
    );
    // Nothing written: no state directory made, the release untouched.
    assert!(!device.path("state").exists());
    assert_eq!(fs::read(&release).unwrap(), before);
    assert_eq!(
        fs::read_dir(kept.join("releases")).unwrap().count(),
        1,
        "the kept releases are only read"
    );
}

#[test]
fn the_self_test_fails_loudly_when_the_anchor_is_writable() {
    let device = Device::new();
    // The anchor on the machine's writable filesystem, as an integrator might leave it.
    let anchor = device.path("anchor");
    write_pub(&anchor, KEY_A);
    let release = release(device.dir.path(), KEY_A, "2026-06-01T00:00:00Z");
    for insecure in [false, true] {
        let config = device.config(
            &format!("writable-{insecure}"),
            &[(
                "insecure_writable_anchor = false",
                &format!("insecure_writable_anchor = {insecure}"),
            )],
        );
        let out = Command::new(BIN)
            .arg("conformance")
            .args(args(&config, "json", &[&release]))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert_contains_all(
            &stderr,
            &[
                "SELF-TEST FAILED",
                "can make the device install anything",
                "mounted read-write",
            ],
        );
        let report = json_of(&out);
        let test = &report["live"]["self_test"];
        assert_eq!(test["verdict"], "fail", "{test:#}");
        // The signature checks themselves still refuse every altered copy.
        assert_eq!(test["checks"].as_array().unwrap().len(), 3, "{test:#}");
        assert_eq!(statuses(&report), expected_with("5.3-2", "not-met"));
        assert_eq!(report["findings"][0]["code"], "anchor-unprotected");
        let message = report["findings"][0]["message"].as_str().unwrap();
        if insecure {
            assert!(message.contains("whoever can write it"), "{message}");
        } else {
            assert!(
                message.contains("refuses it and does not start"),
                "{message}"
            );
        }
    }
}

/// The CycloneDX output of three devices (good, weakened, without a release to test with) is
/// valid against the official CycloneDX 1.6 JSON schema, checked by `scripts/validate-cyclonedx`
/// (pinned `cyclonedx-python-lib`'s schema files and `jsonschema`, offline).
#[test]
fn the_cyclonedx_document_is_valid_against_the_official_schema() {
    let venv_stamp = repo().join("target/cdx-venv/.installed");
    assert!(
        venv_stamp.exists(),
        "the CycloneDX schema validator is not set up: run `scripts/validate-cyclonedx --setup` \
         (it installs cyclonedx-python-lib and jsonschema from PyPI into target/cdx-venv; \
         .ci/run does this before cargo test)"
    );
    let device = Device::new();
    let release = release(device.dir.path(), KEY_A, "2026-06-01T00:00:00Z");
    let good = device.config("good", &[]);
    let weak = device.config("weak", &[("auto_install = true", "auto_install = false")]);
    let outputs = device.run_read_only(&[
        ("good", args(&good, "cyclonedx", &[&release])),
        ("weak", args(&weak, "cyclonedx", &[&release])),
        ("no-release", args(&good, "cyclonedx", &[])),
    ]);
    let mut files = Vec::new();
    for (name, out) in &outputs {
        let path = device.path(&format!("{name}.cdx.json"));
        fs::write(&path, &out.stdout).unwrap();
        files.push(path);
        check_references(name, &json_of(out));
    }
    let out = Command::new(repo().join("scripts/validate-cyclonedx"))
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "invalid CycloneDX 1.6:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).matches("valid CycloneDX 1.6").count(), 3);

    let good = json_of(&outputs["good"]);
    let standard = &good["definitions"]["standards"][0];
    assert_eq!(standard["name"], "ETSI EN 303 645 clause 5.3");
    assert_eq!(standard["version"], "2.1.1");
    let requirements = standard["requirements"].as_array().unwrap();
    assert_eq!(requirements.len(), 16 + standard::units().count());
    let unit = requirements
        .iter()
        .find(|r| r["bom-ref"] == "req-5.3-9-1c")
        .unwrap();
    assert_eq!(unit["parent"], "req-5.3-9");
    let map = good["declarations"]["attestations"][0]["map"]
        .as_array()
        .unwrap();
    let entry = |requirement: &str| {
        map.iter()
            .find(|m| m["requirement"] == requirement)
            .unwrap_or_else(|| panic!("no attestation for {requirement}"))
    };
    assert_eq!(entry("req-5.3-2")["conformance"]["score"], 1.0);
    assert_eq!(entry("req-5.3-2-2b")["conformance"]["score"], 1.0);
    // A declaration is a claim whose evidence the manufacturer wrote, not the agent.
    let declared = entry("req-5.3-13");
    assert!(declared["confidence"].get("score").is_none(), "{declared}");
    let evidence = member_with(&good["declarations"]["evidence"], "bom-ref", "ev-5.3-13");
    assert!(
        evidence["author"]["name"]
            .as_str()
            .unwrap()
            .contains("not verified by the agent")
    );
    // The weakened device: 5.3-6 scores 0 and its claim carries the finding as counter-evidence.
    let weak = json_of(&outputs["weak"]);
    let map = weak["declarations"]["attestations"][0]["map"]
        .as_array()
        .unwrap();
    let p6 = map
        .iter()
        .find(|m| m["requirement"] == "req-5.3-6")
        .unwrap();
    assert_eq!(p6["conformance"]["score"], 0.0);
    let claim = member_with(&weak["declarations"]["claims"], "bom-ref", "claim-5.3-6");
    assert_eq!(
        claim["counterEvidence"],
        json!(["ev-finding-5.3-6-auto-install-off"])
    );
}

/// Every `bom-ref` is unique and every reference points at one.
fn check_references(name: &str, doc: &Value) {
    fn walk(value: &Value, refs: &mut Vec<String>, links: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("bom-ref", Value::String(r)) => refs.push(r.clone()),
                        ("requirement" | "target" | "assessor" | "parent", Value::String(link)) => {
                            links.push(link.clone())
                        }
                        ("claims" | "evidence" | "counterEvidence", Value::Array(items))
                            if items.iter().all(Value::is_string) =>
                        {
                            links.extend(items.iter().map(|i| i.as_str().unwrap().to_string()))
                        }
                        _ => walk(value, refs, links),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, refs, links)),
            _ => {}
        }
    }
    let (mut refs, mut links) = (Vec::new(), Vec::new());
    walk(doc, &mut refs, &mut links);
    let mut unique = refs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), refs.len(), "{name}: duplicate bom-refs");
    for link in links {
        assert!(refs.contains(&link), "{name}: {link} points at nothing");
    }
}

#[test]
fn every_test_named_in_the_test_unit_map_exists() {
    let rows: Vec<_> = test_map::rows().collect();
    let units: Vec<&str> = standard::units().map(|(_, u)| u.id).collect();
    let mapped: Vec<&str> = rows.iter().map(|(unit, _)| *unit).collect();
    assert_eq!(
        mapped, units,
        "docs/conformance-test-map.md must list every test unit once, in order"
    );
    let mut named = 0;
    for (unit, tests) in &rows {
        for test in tests {
            let (file, function) = test
                .split_once("::")
                .unwrap_or_else(|| panic!("{unit}: {test} is not FILE::FUNCTION"));
            let source = fs::read_to_string(repo().join(file))
                .unwrap_or_else(|e| panic!("{unit}: {file}: {e}"));
            let defined = source.contains(&format!("fn {function}()"))
                || source.contains(&format!("fn {function}("));
            assert!(defined, "{unit}: no `fn {function}` in {file}");
            named += 1;
        }
    }
    assert!(named > 50, "only {named} tests named");
}

/// A real install cycle through the binary (file slots, the file bootloader, a reboot by the
/// kernel facts): a tampered and an older release refused, a release installed and committed,
/// a second one rolled back after a failed health check. The report takes each from the
/// agent's own event log: time from signing to commit, refusals by reason, the rollback.
#[test]
fn time_to_patch_refusals_and_rollbacks_come_from_the_event_log() {
    let mut dev = common::gateway()
        .compatible(EXAMPLE_COMPATIBLE)
        .signer(sim::Signer::from_seed(KEY_A))
        .slot_size(1024 * 1024)
        .slot_contents(pattern(200_003, 1), Vec::new())
        .configure(|c| c.device.factory_version = Some("1.0".into()))
        .build()
        .unwrap();
    let image = pattern(300_017, 7);
    fs::write(dev.path("rootfs.img"), &image).unwrap();
    let url = format!("file://{}", dev.path("rootfs.img").display());
    let release_file = |name: &str, version: &str, security_version: u64, created| {
        dev.release(version)
            .security_version(security_version)
            .created(created)
            .image(&url, &image)
            .write(&dev.path(name))
            .unwrap()
    };
    // Signed three days ago: that is the time-to-patch the report must show.
    let created = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(72);
    let v2 = release_file("v2.json", "2.0", 5, created);
    let v3 = release_file("v3.json", "3.0", 6, jiff::Timestamp::now());
    let old = release_file("old.json", "0.9", 1, created);
    fs::write(
        dev.path("tampered.json"),
        sim::tamper(&fs::read(&v2).unwrap()),
    )
    .unwrap();
    let config = dev.config_path().to_owned();
    let agent = |dev: &Gateway, args: &[&str]| {
        let out = dev.run(args);
        (out.status.code(), text(&out.stdout) + &text(&out.stderr))
    };

    assert_eq!(agent(&dev, &["boot-check", "--no-reboot"]).0, Some(0));
    let (code, log) = agent(
        &dev,
        &["install", dev.path("tampered.json").to_str().unwrap()],
    );
    assert_eq!(code, Some(1), "{log}");
    let (code, log) = agent(&dev, &["install", v2.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(dev.boot(), "B");
    let (code, log) = agent(&dev, &["boot-check", "--no-reboot"]);
    assert_eq!(code, Some(0), "{log}");
    // The floor is 5 now: the older release is a downgrade.
    let (code, log) = agent(&dev, &["install", old.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{log}");
    // 3.0 goes to A, whose trial fails its health check: back to B.
    let (code, log) = agent(&dev, &["install", v3.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{log}");
    dev.set_health(&[&["false"]]);
    assert_eq!(dev.boot(), "A");
    agent(&dev, &["boot-check", "--no-reboot"]);
    assert_eq!(dev.boot(), "B");
    agent(&dev, &["boot-check", "--no-reboot"]);

    let out = Command::new(BIN)
        .args(["conformance", "--format", "json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let report = json_of(&out);
    let live = &report["live"];
    assert_eq!(live["running_version"], "2.0", "{live:#}");
    assert_eq!(live["booted_slot"], "B");
    let history = &live["history"];
    let installed = history["installed"].as_array().unwrap();
    assert_eq!(installed.len(), 1, "{history:#}");
    assert_eq!(installed[0]["version"], "2.0");
    let signed_at: jiff::Timestamp = installed[0]["created"].as_str().unwrap().parse().unwrap();
    assert_eq!(signed_at, created);
    let time_to_patch = installed[0]["time_to_patch_seconds"].as_i64().unwrap();
    assert!(
        (72 * 3600..72 * 3600 + 600).contains(&time_to_patch),
        "{time_to_patch}"
    );
    let on_device = installed[0]["on_device_seconds"].as_i64().unwrap();
    assert!((0..600).contains(&on_device), "{on_device}");
    assert_eq!(
        history["refusals"],
        json!([
            {"reason": "bad-signature", "count": 1},
            {"reason": "downgrade", "count": 1},
        ])
    );
    let rollbacks = history["rollbacks"].as_array().unwrap();
    assert_eq!(rollbacks.len(), 1, "{history:#}");
    assert_eq!(rollbacks[0]["version"], "3.0");
    assert_eq!(rollbacks[0]["reason"], "health-check-failed");
    // The text report says the same to a person.
    let out = Command::new(BIN)
        .args(["conformance", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let report = text(&out.stdout);
    assert_contains_all(
        &report,
        &[
            "time-to-patch 3d",
            "bad-signature 1 (tamper sign), downgrade 1",
            "3.0 at ",
        ],
    );
}
