//! The report as a CycloneDX 1.6 attestation (`--format cyclonedx`), for a test laboratory's
//! tools:
//!
//! - `definitions.standards[0]`: EN 303 645 §5.3 as requirements `req-5.3-N`, each TS 103 701
//!   test unit a child requirement (`req-5.3-2-2b`, `parent: req-5.3-2`);
//! - `declarations.claims`: per provision what the device does (`predicate`), why that meets
//!   the requirement (`reasoning`), `evidence` and, for findings, `counterEvidence`;
//! - `declarations.evidence`: the evidence as text attachments — the agent's own (checked on
//!   the device) or the manufacturer's declarations, told apart by their author;
//! - `declarations.attestations[0].map`: requirement → claims with `conformance` (score,
//!   rationale) and `confidence`.

use serde_json::{Map, Value};

use super::selftest::Verdict;
use super::standard::{self, PROVISIONS};
use super::{Report, Status};

pub const SPEC_VERSION: &str = "1.6";

/// A JSON object from its fields (a plain function rather than `json!`, whose expansion per
/// field costs the device binary several KiB here).
fn obj(fields: Vec<(&str, Value)>) -> Value {
    // Inserted one by one: collecting would sort, which costs its own code.
    let mut map = Map::new();
    for (key, value) in fields {
        map.insert(key.to_string(), value);
    }
    Value::Object(map)
}

fn strs<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
    Value::Array(items.into_iter().map(|s| Value::String(s.into())).collect())
}

pub fn render(report: &Report) -> Value {
    let generated = report.generated.to_string();
    let device_name = report
        .device
        .model
        .clone()
        .unwrap_or_else(|| report.device.compatible.clone());
    let agent_name = format!(
        "update-agent {} on {}",
        report.agent.version,
        report
            .device
            .device_id
            .as_deref()
            .unwrap_or(&report.device.compatible)
    );
    let agent_author = || obj(vec![("name", agent_name.clone().into())]);
    let evidence_of = |bom_ref: String, property: String, data: Vec<Value>, author: Value| {
        obj(vec![
            ("bom-ref", bom_ref.into()),
            ("propertyName", property.into()),
            ("data", Value::Array(data)),
            ("created", generated.clone().into()),
            ("author", author),
        ])
    };

    let mut requirements = Vec::new();
    for p in PROVISIONS {
        requirements.push(obj(vec![
            ("bom-ref", format!("req-{}", p.id).into()),
            ("identifier", p.id.into()),
            ("title", p.title.into()),
            (
                "text",
                format!("{} (paraphrase; see the standard for its text)", p.title).into(),
            ),
            (
                "descriptions",
                strs([format!(
                    "{} ({}){}",
                    p.level.as_str(),
                    super::level_letter(p.level),
                    p.condition
                        .map(|c| format!(", where {c}"))
                        .unwrap_or_default()
                )]),
            ),
        ]));
        for u in p.units {
            let kind = match u.kind {
                standard::UnitKind::Conceptual => "conceptual",
                standard::UnitKind::Functional => "functional",
            };
            requirements.push(obj(vec![
                ("bom-ref", format!("req-{}", u.id).into()),
                (
                    "identifier",
                    format!("{} {}", standard::TEST_SPEC, u.id).into(),
                ),
                ("title", format!("test unit {} ({kind})", u.id).into()),
                ("text", u.checks.into()),
                ("parent", format!("req-{}", p.id).into()),
            ]));
        }
    }

    let mut claims = Vec::new();
    let mut evidence = Vec::new();
    let mut map = Vec::new();
    for p in &report.provisions {
        let evidence_ref = format!("ev-{}", p.id);
        let mut data = Vec::new();
        for (n, line) in p.evidence.iter().enumerate() {
            data.push(text_data(&format!("evidence {}", n + 1), line));
        }
        for unit in &p.test_units {
            if !unit.tests.is_empty() {
                data.push(text_data(
                    &format!("automated tests in the agent's repository for {}", unit.id),
                    &unit.tests.join("\n"),
                ));
            }
        }
        let declared = matches!(p.status, Status::Declared | Status::NeedsDeclaration);
        evidence.push(evidence_of(
            evidence_ref.clone(),
            format!("{} {}", standard::STANDARD, p.id),
            data,
            if declared {
                obj(vec![("name", MANUFACTURER.into())])
            } else {
                agent_author()
            },
        ));
        let mut claim_evidence = vec![evidence_ref, "ev-ixit".to_string()];
        match p.id {
            "5.3-2" if report.live.is_some() => claim_evidence.push("ev-self-test".into()),
            "5.3-5" | "5.3-8" if report.live.is_some() => {
                claim_evidence.push("ev-event-log".into())
            }
            _ => {}
        }
        let counter: Vec<String> = report
            .findings
            .iter()
            .filter(|f| f.provision == p.id)
            .map(|f| format!("ev-finding-{}-{}", f.provision, f.code))
            .collect();
        let mut claim = vec![
            ("bom-ref", format!("claim-{}", p.id).into()),
            ("target", "device".into()),
            ("predicate", p.control.clone().into()),
            ("reasoning", reasoning(p).into()),
            ("evidence", strs(claim_evidence)),
        ];
        if !counter.is_empty() {
            claim.push(("counterEvidence", strs(counter)));
        }
        claims.push(obj(claim));
        map.push(obj(vec![
            ("requirement", format!("req-{}", p.id).into()),
            ("claims", strs([format!("claim-{}", p.id)])),
            ("conformance", conformance(p.status, reasoning(p))),
            ("confidence", confidence(p.status, &generated)),
        ]));
    }
    for f in &report.findings {
        evidence.push(evidence_of(
            format!("ev-finding-{}-{}", f.provision, f.code),
            format!("{} {}", standard::STANDARD, f.provision),
            vec![text_data(
                &format!("finding {} ({})", f.code, f.status.as_str()),
                &f.message,
            )],
            agent_author(),
        ));
    }
    let ixit = report
        .ixit
        .iter()
        .map(|field| {
            text_data(
                &format!("IXIT {} / {}", field.ixit, field.field),
                &field.value,
            )
        })
        .collect();
    evidence.push(evidence_of(
        "ev-ixit".into(),
        "ETSI TS 103 701 IXIT".into(),
        ixit,
        agent_author(),
    ));
    if let Some(live) = &report.live {
        let test = &live.self_test;
        evidence.push(evidence_of(
            "ev-self-test".into(),
            format!("{} 5.3-2-2b", standard::TEST_SPEC),
            vec![json_data(
                "self-test (altered copies of a genuine release, verified in memory)",
                test,
            )],
            agent_author(),
        ));
        evidence.push(evidence_of(
            "ev-event-log".into(),
            "the agent's event log: time-to-patch, refusals by reason, rollbacks".into(),
            vec![
                json_data("history", &live.history),
                json_data("last check for updates", &live.last_check),
            ],
            agent_author(),
        ));
        if test.verdict != Verdict::NotRun {
            let passed = test.verdict == Verdict::Pass;
            claims.push(obj(vec![
                ("bom-ref", "claim-self-test".into()),
                ("target", "device".into()),
                (
                    "predicate",
                    "altered copies of a release this device accepts are refused".into(),
                ),
                (
                    "reasoning",
                    format!(
                        "the self-test altered copies of a genuine release as an attacker without the signing keys could and verified each as a received release is verified: {}",
                        if passed {
                            "each was refused with the expected reason"
                        } else {
                            test.reason.as_deref().unwrap_or("FAILED")
                        }
                    )
                    .into(),
                ),
                ("evidence", strs(["ev-self-test"])),
            ]));
            map.push(obj(vec![
                ("requirement", "req-5.3-2-2b".into()),
                ("claims", strs(["claim-self-test"])),
                (
                    "conformance",
                    obj(vec![
                        ("score", if passed { 1.0 } else { 0.0 }.into()),
                        (
                            "rationale",
                            if passed {
                                "PASS: every altered copy was refused"
                            } else {
                                "FAIL"
                            }
                            .into(),
                        ),
                    ]),
                ),
                ("confidence", confidence(Status::Met, &generated)),
            ]));
        }
    }
    let declarations = report
        .declarations
        .iter()
        .filter_map(|d| {
            d.value.as_ref().map(|value| {
                obj(vec![
                    ("name", format!("update-agent:declaration:{}", d.key).into()),
                    ("value", value.clone().into()),
                ])
            })
        })
        .collect();
    let property =
        |name: &str, value: String| obj(vec![("name", name.into()), ("value", value.into())]);
    let mut properties = vec![property(
        "update-agent:compatible",
        report.device.compatible.clone(),
    )];
    if let Some(id) = &report.device.device_id {
        properties.push(property("update-agent:device-id", id.clone()));
    }
    if let Some(end) = report.device.support_end {
        properties.push(property("update-agent:support-end", end.to_string()));
    }
    let mut device = vec![
        ("type", "device".into()),
        ("bom-ref", "device".into()),
        ("name", device_name.into()),
        ("properties", Value::Array(properties)),
    ];
    if let Some(version) = report.live.as_ref().and_then(|l| l.running_version.clone()) {
        device.push(("version", version.into()));
    }
    let application = |extra: (&'static str, Value)| {
        obj(vec![
            ("type", "application".into()),
            ("name", "update-agent".into()),
            ("version", report.agent.version.into()),
            extra,
        ])
    };
    obj(vec![
        ("bomFormat", "CycloneDX".into()),
        ("specVersion", SPEC_VERSION.into()),
        ("serialNumber", serial_number().into()),
        ("version", 1.into()),
        (
            "metadata",
            obj(vec![
                ("timestamp", generated.clone().into()),
                (
                    "tools",
                    obj(vec![(
                        "components",
                        Value::Array(vec![application((
                            "description",
                            "update-agent conformance".into(),
                        ))]),
                    )]),
                ),
                ("component", obj(device)),
                ("properties", Value::Array(declarations)),
            ]),
        ),
        (
            "components",
            Value::Array(vec![{
                let mut component = application(("bom-ref", "update-agent".into()));
                component["description"] = if report.agent.device_build {
                    "device build"
                } else {
                    "workstation build"
                }
                .into();
                component
            }]),
        ),
        (
            "definitions",
            obj(vec![(
                "standards",
                Value::Array(vec![obj(vec![
                    ("bom-ref", "std-en-303-645-5.3".into()),
                    (
                        "name",
                        format!("{} clause {}", standard::STANDARD, standard::CLAUSE).into(),
                    ),
                    ("version", standard::STANDARD_VERSION.into()),
                    (
                        "description",
                        format!(
                            "{}, clause {} ({}); test units of {} V{} as child requirements",
                            standard::STANDARD,
                            standard::CLAUSE,
                            standard::CLAUSE_TITLE,
                            standard::TEST_SPEC,
                            standard::TEST_SPEC_VERSION
                        )
                        .into(),
                    ),
                    ("owner", "ETSI".into()),
                    ("requirements", Value::Array(requirements)),
                ])]),
            )]),
        ),
        (
            "declarations",
            obj(vec![
                (
                    "assessors",
                    Value::Array(vec![obj(vec![
                        ("bom-ref", "assessor-update-agent".into()),
                        ("thirdParty", false.into()),
                        ("organization", agent_author()),
                    ])]),
                ),
                (
                    "attestations",
                    Value::Array(vec![obj(vec![
                        ("summary", report.summary().text().into()),
                        ("assessor", "assessor-update-agent".into()),
                        ("map", Value::Array(map)),
                    ])]),
                ),
                ("claims", Value::Array(claims)),
                ("evidence", Value::Array(evidence)),
            ]),
        ),
    ])
}

const MANUFACTURER: &str = "the manufacturer: a declaration in the [conformance] section of the agent's configuration, not verified by the agent";

fn reasoning(p: &super::ProvisionReport) -> String {
    let mut text = format!("{}: {}", p.status.as_str(), p.control);
    if let Some(why) = &p.justification {
        text.push_str(". Justification: ");
        text.push_str(why);
    }
    text
}

fn conformance(status: Status, rationale: String) -> Value {
    let score = match status {
        Status::Met | Status::Declared => Some(1.0),
        Status::Weakened => Some(0.5),
        Status::NotMet => Some(0.0),
        Status::NotApplicable | Status::NeedsDeclaration => None,
    };
    let mut fields = vec![("rationale", rationale.into())];
    if let Some(score) = score {
        fields.push(("score", score.into()));
    }
    obj(fields)
}

fn confidence(status: Status, generated: &str) -> Value {
    match status {
        Status::Declared | Status::NeedsDeclaration => obj(vec![(
            "rationale",
            "rests on the manufacturer's declaration, which the agent cannot verify".into(),
        )]),
        _ => obj(vec![
            ("score", 1.0.into()),
            (
                "rationale",
                format!(
                    "determined by the agent itself at {generated} from its build, its configuration and the device's state"
                )
                .into(),
            ),
        ]),
    }
}

fn attachment(name: &str, content_type: &str, content: String) -> Value {
    obj(vec![
        ("name", name.into()),
        (
            "contents",
            obj(vec![(
                "attachment",
                obj(vec![
                    ("contentType", content_type.into()),
                    ("content", content.into()),
                ]),
            )]),
        ),
    ])
}

fn text_data(name: &str, text: &str) -> Value {
    attachment(name, "text/plain", text.to_string())
}

/// Pretty-printed, as the JSON report is: the same serialiser code serves both.
fn json_data(name: &str, value: &impl serde::Serialize) -> Value {
    let content = serde_json::to_string_pretty(value).expect("report parts always serialise");
    attachment(name, "application/json", content)
}

/// `urn:uuid:` and a random (version 4) UUID: each document is a new BOM.
fn serial_number() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness: the time still makes the number unique enough for one device.
        let nanos = jiff::Timestamp::now().as_nanosecond();
        bytes = nanos.to_le_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
