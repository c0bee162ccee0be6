//! The yardstick: the 16 provisions of ETSI EN 303 645 V2.1.1 clause 5.3 ("Keep software
//! updated") and the test units ETSI TS 103 701 V1.1.1 defines for them. Provisions and units
//! are cited by their numbers; the titles and unit descriptions here are this project's short
//! paraphrases, not the standards' wording (read the standards for that).

use serde::Serialize;

pub const STANDARD: &str = "ETSI EN 303 645";
pub const STANDARD_VERSION: &str = "2.1.1";
pub const CLAUSE: &str = "5.3";
pub const CLAUSE_TITLE: &str = "Keep software updated";
pub const TEST_SPEC: &str = "ETSI TS 103 701";
pub const TEST_SPEC_VERSION: &str = "1.1.1";

/// How binding a provision is: "shall" (mandatory, M) or "should" (recommended, R).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    Shall,
    Should,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Shall => "shall",
            Level::Should => "should",
        }
    }
}

/// A TS 103 701 test unit: conceptual units assess the documentation (ICS/IXIT), functional
/// units the device itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnitKind {
    Conceptual,
    Functional,
}

#[derive(Debug)]
pub struct Unit {
    /// e.g. `5.3-2-2b`: provision 5.3-2, test case 2 (functional), unit b.
    pub id: &'static str,
    pub kind: UnitKind,
    /// What the test laboratory checks, paraphrased.
    pub checks: &'static str,
}

#[derive(Debug)]
pub struct Provision {
    pub id: &'static str,
    pub level: Level,
    /// When the provision applies, where the standard makes it conditional.
    pub condition: Option<&'static str>,
    /// Paraphrase of the provision.
    pub title: &'static str,
    pub units: &'static [Unit],
}

const fn c(id: &'static str, checks: &'static str) -> Unit {
    Unit {
        id,
        kind: UnitKind::Conceptual,
        checks,
    }
}

const fn f(id: &'static str, checks: &'static str) -> Unit {
    Unit {
        id,
        kind: UnitKind::Functional,
        checks,
    }
}

const CONSTRAINED: Option<&str> = Some("constrained devices whose software cannot be updated");

pub const PROVISIONS: &[Provision] = &[
    Provision {
        id: "5.3-1",
        level: Level::Should,
        condition: None,
        title: "Every software component of the device can be updated securely",
        units: &[
            c(
                "5.3-1-1a",
                "components without an update mechanism: is the absence justified?",
            ),
            c(
                "5.3-1-1b",
                "the conceptual misuse assessment (5.3-2-1) for every mechanism in 6-SoftComp",
            ),
            f(
                "5.3-1-2a",
                "the functional misuse attempts (5.3-2-2) for every mechanism in 6-SoftComp",
            ),
        ],
    },
    Provision {
        id: "5.3-2",
        level: Level::Shall,
        condition: Some("the device is not a constrained device"),
        title: "The device has a mechanism that installs updates securely",
        units: &[
            c(
                "5.3-2-1a",
                "does the mechanism's design keep an attacker from misusing it?",
            ),
            f(
                "5.3-2-2a",
                "devise attacks on the mechanism from its description",
            ),
            f(
                "5.3-2-2b",
                "carry them out: altered, old or foreign updates must be refused",
            ),
        ],
    },
    Provision {
        id: "5.3-3",
        level: Level::Shall,
        condition: Some("the software can be updated"),
        title: "Applying an update is simple for the user",
        units: &[c(
            "5.3-3-1a",
            "is every component covered by a mechanism that is simple to apply?",
        )],
    },
    Provision {
        id: "5.3-4",
        level: Level::Should,
        condition: Some("the software can be updated"),
        title: "Updates are installed by automatic mechanisms",
        units: &[
            c(
                "5.3-4-1a",
                "does a mechanism check for and apply updates without user action?",
            ),
            c(
                "5.3-4-1b",
                "where automation can be configured, is it on by default?",
            ),
        ],
    },
    Provision {
        id: "5.3-5",
        level: Level::Should,
        condition: Some("the software can be updated"),
        title: "The device looks for security updates after start-up and then periodically",
        units: &[c(
            "5.3-5-1a",
            "does the device itself check after initialisation and periodically?",
        )],
    },
    Provision {
        id: "5.3-6",
        level: Level::Should,
        condition: Some("the device supports automatic updates or update notifications"),
        title: "Automatic updates are on by default and the user can enable, disable or postpone them",
        units: &[
            c("5.3-6-1a", "which mechanisms update automatically?"),
            c(
                "5.3-6-1b",
                "can the user enable, disable or postpone automatic security updates?",
            ),
            c(
                "5.3-6-1c",
                "are automatic updates on in the initialised state?",
            ),
            c(
                "5.3-6-1d",
                "can the user enable, disable or postpone update notifications?",
            ),
            c(
                "5.3-6-1e",
                "are update notifications on in the initialised state?",
            ),
            f(
                "5.3-6-2a",
                "on the device: automatic updates are on in the initialised state",
            ),
            f(
                "5.3-6-2b",
                "on the device: change the automatic update setting as documented",
            ),
            f(
                "5.3-6-2c",
                "on the device: notifications are on in the initialised state",
            ),
            f(
                "5.3-6-2d",
                "on the device: change the notification setting as documented",
            ),
        ],
    },
    Provision {
        id: "5.3-7",
        level: Level::Shall,
        condition: Some("the software can be updated"),
        title: "The update mechanism uses best-practice cryptography",
        units: &[
            c(
                "5.3-7-1a",
                "do the security guarantees include at least integrity and authenticity?",
            ),
            c(
                "5.3-7-1b",
                "does the mechanism as described achieve those guarantees?",
            ),
            c(
                "5.3-7-1c",
                "are the cryptographic details best practice by a reference catalogue?",
            ),
            c(
                "5.3-7-1d",
                "are the cryptographic details free of known feasible attacks?",
            ),
        ],
    },
    Provision {
        id: "5.3-8",
        level: Level::Shall,
        condition: Some("the software can be updated"),
        title: "Security updates reach devices in good time",
        units: &[
            c(
                "5.3-8-1a",
                "do the update procedures (8-UpdProc) allow timely deployment?",
            ),
            c(
                "5.3-8-1b",
                "is the implementation of the procedures confirmed (4-Conf)?",
            ),
        ],
    },
    Provision {
        id: "5.3-9",
        level: Level::Should,
        condition: Some("the software can be updated"),
        title: "The device checks that each update is authentic and unaltered",
        units: &[
            c(
                "5.3-9-1a",
                "is authenticity (origin and target) verified before installation?",
            ),
            c("5.3-9-1b", "is integrity verified?"),
            c("5.3-9-1c", "does the device itself verify authenticity?"),
            c("5.3-9-1d", "does the device itself verify integrity?"),
        ],
    },
    Provision {
        id: "5.3-10",
        level: Level::Shall,
        condition: Some("updates are delivered over a network interface"),
        title: "Updates arriving over a network are verified through a trust relationship",
        units: &[
            c(
                "5.3-10-1a",
                "the authenticity and integrity units a-b of 5.3-9-1",
            ),
            c(
                "5.3-10-1b",
                "does verification rest on a valid trust relationship (signature, authenticated channel)?",
            ),
            f(
                "5.3-10-1c",
                "are there network update mechanisms the IXIT does not list?",
            ),
        ],
    },
    Provision {
        id: "5.3-11",
        level: Level::Should,
        condition: Some("the software can be updated"),
        title: "The user is told, recognisably, that a security update is needed and what it fixes",
        units: &[
            c(
                "5.3-11-1a",
                "is the notice of a required security update recognisable and apparent?",
            ),
            c(
                "5.3-11-1b",
                "does the notice say which risks the update mitigates?",
            ),
        ],
    },
    Provision {
        id: "5.3-12",
        level: Level::Should,
        condition: Some("the software can be updated"),
        title: "The user is told before an update disrupts the device's basic functions",
        units: &[c(
            "5.3-12-1a",
            "does the device itself notify the user of disruptive updates?",
        )],
    },
    Provision {
        id: "5.3-13",
        level: Level::Shall,
        condition: None,
        title: "The defined support period is published clearly and accessibly",
        units: &[
            c(
                "5.3-13-1a",
                "is the publication understandable without technical knowledge?",
            ),
            f(
                "5.3-13-2a",
                "is the way to the publication provided as described?",
            ),
            f(
                "5.3-13-2b",
                "is the publication reachable without restriction (no registration)?",
            ),
            f(
                "5.3-13-2c",
                "does it state the support period of the updateable components?",
            ),
        ],
    },
    Provision {
        id: "5.3-14",
        level: Level::Should,
        condition: CONSTRAINED,
        title: "A device that cannot be updated has its rationale, replacement support and support period published",
        units: &[
            c(
                "5.3-14-1a",
                "are rationale and replacement documentation understandable?",
            ),
            f(
                "5.3-14-2a",
                "is the way to the publication provided as described?",
            ),
            f("5.3-14-2b", "is it reachable without restriction?"),
            f("5.3-14-2c", "does it give the rationale for no updates?"),
            f(
                "5.3-14-2d",
                "does it give period and method of hardware replacement?",
            ),
            f("5.3-14-2e", "does it give a defined support period?"),
        ],
    },
    Provision {
        id: "5.3-15",
        level: Level::Should,
        condition: CONSTRAINED,
        title: "A device that cannot be updated can be isolated and its hardware replaced",
        units: &[
            c("5.3-15-1a", "is the isolation method (9-ReplSup) suitable?"),
            c("5.3-15-1b", "is the hardware replacement method suitable?"),
            f(
                "5.3-15-2a",
                "set the product up in its intended environment",
            ),
            f("5.3-15-2b", "isolate it as described"),
            f(
                "5.3-15-2c",
                "only connectivity is lost, or the isolated environment keeps integrity",
            ),
            f("5.3-15-2d", "replace the hardware as described"),
            f(
                "5.3-15-2e",
                "connectivity and function come back on the replacement",
            ),
        ],
    },
    Provision {
        id: "5.3-16",
        level: Level::Shall,
        condition: None,
        title: "The model designation is clearly recognisable, by a label or a physical interface",
        units: &[
            c(
                "5.3-16-1a",
                "can the model designation be obtained clearly as described?",
            ),
            f("5.3-16-2a", "obtain the model designation as described"),
            f(
                "5.3-16-2b",
                "is it plain text and does it match the documented one?",
            ),
        ],
    },
];

pub fn provision(id: &str) -> Option<&'static Provision> {
    PROVISIONS.iter().find(|p| p.id == id)
}

/// Every test unit, in the standard's order.
pub fn units() -> impl Iterator<Item = (&'static Provision, &'static Unit)> {
    PROVISIONS
        .iter()
        .flat_map(|p| p.units.iter().map(move |u| (p, u)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisions_and_units_are_numbered_as_the_standards_number_them() {
        assert_eq!(PROVISIONS.len(), 16);
        for (n, provision) in PROVISIONS.iter().enumerate() {
            assert_eq!(provision.id, format!("5.3-{}", n + 1));
            assert!(!provision.units.is_empty(), "{}", provision.id);
            for unit in provision.units {
                let rest = unit.id.strip_prefix(provision.id).unwrap();
                let case = match unit.kind {
                    UnitKind::Conceptual => "-1",
                    UnitKind::Functional => "-2",
                };
                // 5.3-10-1 is one test case with conceptual and functional units.
                let case_ok =
                    rest.starts_with(case) || (provision.id == "5.3-10" && rest.starts_with("-1"));
                assert!(case_ok, "{}", unit.id);
                assert_eq!(rest.len(), 3, "{}", unit.id);
            }
        }
        assert_eq!(units().count(), 55);
    }
}
