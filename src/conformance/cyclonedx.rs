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

use serde_json::{Value, json};

use super::selftest::Verdict;
use super::standard::{self, PROVISIONS};
use super::{Report, Status};

pub const SPEC_VERSION: &str = "1.6";

pub fn render(report: &Report) -> Value {
    let generated = report.generated.to_string();
    let device_name = report
        .device
        .model
        .clone()
        .unwrap_or_else(|| report.device.compatible.clone());
    let agent_author = json!({"name": format!(
        "update-agent {} on {}",
        report.agent.version,
        report.device.device_id.as_deref().unwrap_or(&report.device.compatible)
    )});
    let manufacturer_author = json!({
        "name": "the manufacturer: a declaration in the [conformance] section of the agent's configuration, not verified by the agent"
    });

    let mut requirements = Vec::new();
    for p in PROVISIONS {
        requirements.push(json!({
            "bom-ref": format!("req-{}", p.id),
            "identifier": p.id,
            "title": p.title,
            "text": format!("{} (paraphrase; see the standard for its text)", p.title),
            "descriptions": [format!(
                "{} ({}){}",
                p.level.as_str(),
                super::level_letter(p.level),
                p.condition.map(|c| format!(", where {c}")).unwrap_or_default()
            )],
        }));
        for u in p.units {
            requirements.push(json!({
                "bom-ref": format!("req-{}", u.id),
                "identifier": format!("{} {}", standard::TEST_SPEC, u.id),
                "title": format!("test unit {} ({})", u.id, match u.kind {
                    standard::UnitKind::Conceptual => "conceptual",
                    standard::UnitKind::Functional => "functional",
                }),
                "text": u.checks,
                "parent": format!("req-{}", p.id),
            }));
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
        let declared = p.status == Status::Declared || p.status == Status::NeedsDeclaration;
        evidence.push(json!({
            "bom-ref": evidence_ref,
            "propertyName": format!("{} {}", standard::STANDARD, p.id),
            "data": data,
            "created": generated,
            "author": if declared { manufacturer_author.clone() } else { agent_author.clone() },
        }));
        let mut claim_evidence = vec![Value::from(evidence_ref), "ev-ixit".into()];
        match p.id {
            "5.3-2" if report.live.is_some() => claim_evidence.push("ev-self-test".into()),
            "5.3-5" | "5.3-8" if report.live.is_some() => {
                claim_evidence.push("ev-event-log".into())
            }
            _ => {}
        }
        let counter: Vec<Value> = report
            .findings
            .iter()
            .filter(|f| f.provision == p.id)
            .map(|f| Value::from(format!("ev-finding-{}-{}", f.provision, f.code)))
            .collect();
        let mut claim = json!({
            "bom-ref": format!("claim-{}", p.id),
            "target": "device",
            "predicate": p.control,
            "reasoning": reasoning(p),
            "evidence": claim_evidence,
        });
        if !counter.is_empty() {
            claim["counterEvidence"] = Value::from(counter);
        }
        claims.push(claim);
        map.push(json!({
            "requirement": format!("req-{}", p.id),
            "claims": [format!("claim-{}", p.id)],
            "conformance": conformance(p.status, &reasoning(p)),
            "confidence": confidence(p.status, &generated),
        }));
    }
    for f in &report.findings {
        evidence.push(json!({
            "bom-ref": format!("ev-finding-{}-{}", f.provision, f.code),
            "propertyName": format!("{} {}", standard::STANDARD, f.provision),
            "data": [text_data(&format!("finding {} ({})", f.code, f.status.as_str()), &f.message)],
            "created": generated,
            "author": agent_author.clone(),
        }));
    }
    let ixit: Vec<Value> = report
        .ixit
        .iter()
        .map(|field| {
            text_data(
                &format!("IXIT {} / {}", field.ixit, field.field),
                &field.value,
            )
        })
        .collect();
    evidence.push(json!({
        "bom-ref": "ev-ixit",
        "propertyName": "ETSI TS 103 701 IXIT",
        "data": ixit,
        "created": generated,
        "author": agent_author.clone(),
    }));
    if let Some(live) = &report.live {
        let test = &live.self_test;
        evidence.push(json!({
            "bom-ref": "ev-self-test",
            "propertyName": format!("{} 5.3-2-2b", standard::TEST_SPEC),
            "data": [json_data("self-test (altered copies of a genuine release, verified in memory)", test)],
            "created": generated,
            "author": agent_author.clone(),
        }));
        evidence.push(json!({
            "bom-ref": "ev-event-log",
            "propertyName": "the agent's event log: time-to-patch, refusals by reason, rollbacks",
            "data": [
                json_data("history", &live.history),
                json_data("last check for updates", &live.last_check),
            ],
            "created": generated,
            "author": agent_author.clone(),
        }));
        if test.verdict != Verdict::NotRun {
            claims.push(json!({
                "bom-ref": "claim-self-test",
                "target": "device",
                "predicate": "altered copies of a release this device accepts are refused",
                "reasoning": format!(
                    "the self-test altered copies of a genuine release as an attacker without the signing keys could and verified each as a received release is verified: {}",
                    match test.verdict {
                        Verdict::Pass => "each was refused with the expected reason".to_string(),
                        _ => format!("FAILED: {}", test.reason.as_deref().unwrap_or("")),
                    }
                ),
                "evidence": ["ev-self-test"],
            }));
            let passed = test.verdict == Verdict::Pass;
            map.push(json!({
                "requirement": "req-5.3-2-2b",
                "claims": ["claim-self-test"],
                "conformance": {
                    "score": if passed { 1.0 } else { 0.0 },
                    "rationale": if passed { "PASS: every altered copy was refused" } else { "FAIL" },
                },
                "confidence": confidence(Status::Met, &generated),
            }));
        }
    }
    let declarations: Vec<Value> = report
        .declarations
        .iter()
        .filter_map(|d| {
            d.value.as_ref().map(|value| json!({"name": format!("update-agent:declaration:{}", d.key), "value": value}))
        })
        .collect();
    let mut device = json!({
        "type": "device",
        "bom-ref": "device",
        "name": device_name,
        "properties": [
            {"name": "update-agent:compatible", "value": report.device.compatible},
        ],
    });
    if let Some(id) = &report.device.device_id {
        device["properties"]
            .as_array_mut()
            .expect("an array")
            .push(json!({"name": "update-agent:device-id", "value": id}));
    }
    if let Some(end) = report.device.support_end {
        device["properties"]
            .as_array_mut()
            .expect("an array")
            .push(json!({"name": "update-agent:support-end", "value": end.to_string()}));
    }
    if let Some(version) = report.live.as_ref().and_then(|l| l.running_version.clone()) {
        device["version"] = version.into();
    }
    json!({
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": serial_number(),
        "version": 1,
        "metadata": {
            "timestamp": generated,
            "tools": {"components": [{
                "type": "application",
                "name": "update-agent",
                "version": report.agent.version,
                "description": "update-agent conformance",
            }]},
            "component": device,
            "properties": declarations,
        },
        "components": [{
            "type": "application",
            "bom-ref": "update-agent",
            "name": "update-agent",
            "version": report.agent.version,
            "description": if report.agent.device_build { "device build" } else { "workstation build" },
        }],
        "definitions": {"standards": [{
            "bom-ref": "std-en-303-645-5.3",
            "name": format!("{} clause {}", standard::STANDARD, standard::CLAUSE),
            "version": standard::STANDARD_VERSION,
            "description": format!(
                "{}, clause {} ({}); test units of {} V{} as child requirements",
                standard::STANDARD,
                standard::CLAUSE,
                standard::CLAUSE_TITLE,
                standard::TEST_SPEC,
                standard::TEST_SPEC_VERSION
            ),
            "owner": "ETSI",
            "requirements": requirements,
        }]},
        "declarations": {
            "assessors": [{
                "bom-ref": "assessor-update-agent",
                "thirdParty": false,
                "organization": {"name": agent_author["name"].clone()},
            }],
            "attestations": [{
                "summary": report.summary().text(),
                "assessor": "assessor-update-agent",
                "map": map,
            }],
            "claims": claims,
            "evidence": evidence,
        },
    })
}

fn reasoning(p: &super::ProvisionReport) -> String {
    let mut text = format!("{}: {}", p.status.as_str(), p.control);
    if let Some(why) = &p.justification {
        text.push_str(&format!(". Justification: {why}"));
    }
    text
}

fn conformance(status: Status, rationale: &str) -> Value {
    let score = match status {
        Status::Met | Status::Declared => Some(1.0),
        Status::Weakened => Some(0.5),
        Status::NotMet => Some(0.0),
        Status::NotApplicable | Status::NeedsDeclaration => None,
    };
    let mut value = json!({"rationale": rationale});
    if let Some(score) = score {
        value["score"] = score.into();
    }
    value
}

fn confidence(status: Status, generated: &str) -> Value {
    match status {
        Status::Declared | Status::NeedsDeclaration => json!({
            "rationale": "rests on the manufacturer's declaration, which the agent cannot verify",
        }),
        _ => json!({
            "score": 1.0,
            "rationale": format!(
                "determined by the agent itself at {generated} from its build, its configuration and the device's state"
            ),
        }),
    }
}

fn text_data(name: &str, text: &str) -> Value {
    json!({"name": name, "contents": {"attachment": {"contentType": "text/plain", "content": text}}})
}

fn json_data(name: &str, value: &impl serde::Serialize) -> Value {
    let content = serde_json::to_string(value).expect("report parts always serialise");
    json!({"name": name, "contents": {"attachment": {"contentType": "application/json", "content": content}}})
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
