//! The bootloader backends against the real tools (libubootenv's fw_printenv/fw_setenv, GRUB's
//! grub-editenv) on environments in temporary files, and whole update cycles with the boot
//! simulator standing in for the boot scripts in `config/boot/`.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::sim::BootEnv;
use common::sim::bootenv::UBOOT_ENV_SIZE;
use common::sim::tools::run_ok;
use common::{Backend, require};
use update_agent::bootloader::simulator::{FAT_UBOOT_SCRIPT, SHIPPED_UBOOT_SCRIPT, UBootScript};
use update_agent::bootloader::{
    Bootloader, BootloaderError, BootloaderKind, SlotBootState, from_config,
};
use update_agent::config::{BootloaderConfig, DEFAULT_BOOT_ATTEMPTS};

/// One device: a backend, and the environment it works on, which the test reads and changes
/// with the real tools and boots with the boot scripts' simulator.
struct Rig {
    bl: Box<dyn Bootloader>,
    env: BootEnv,
    _dir: tempfile::TempDir,
}

/// The slots' bootnames, as the agent's config gives them.
fn slots() -> [String; 2] {
    ["A".to_owned(), "B".to_owned()]
}

impl Rig {
    /// A fresh environment: the file backend's file absent, an empty U-Boot environment, an
    /// empty grubenv.
    fn new(backend: Backend) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let env = BootEnv::create(backend, dir.path()).unwrap();
        Rig::on(dir, env)
    }

    fn on(dir: tempfile::TempDir, env: BootEnv) -> Rig {
        Rig {
            bl: from_config(&slots(), &env.config()).unwrap(),
            env,
            _dir: dir,
        }
    }

    fn uboot() -> Rig {
        Rig::new(Backend::UBoot)
    }

    /// The U-Boot backend with a boot script's own text run at every boot (the simulator's
    /// interpreter), on the environment fw_setenv writes.
    fn uboot_running(script: UBootScript) -> Rig {
        let mut rig = Rig::uboot();
        rig.env.uboot_script = script;
        rig
    }

    fn grub() -> Rig {
        Rig::new(Backend::Grub)
    }

    fn file() -> Rig {
        Rig::new(Backend::File)
    }

    /// A variable as the tool (or the file) shows it, bypassing the agent's parser.
    fn get(&self, name: &str) -> Option<String> {
        self.env.get(name)
    }

    /// Sets a variable behind the agent's back.
    fn set(&self, name: &str, value: &str) {
        self.env.set(name, value)
    }

    fn boot(&self) -> String {
        self.env.boot().expect("the simulated board boots")
    }

    fn primary(&self) -> Option<String> {
        self.bl.primary().unwrap()
    }

    /// Activates B and sets `name` to `value` behind the agent's back: reading the primary slot
    /// must then fail with an error that says `says`.
    #[track_caller]
    fn assert_activated_then_refused(&self, name: &str, value: &str, says: &str) {
        self.bl.mark_active("B").unwrap();
        self.set(name, value);
        let err = self.bl.primary().unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
    }

    /// How many boots a freshly activated slot gets before the script falls back.
    fn trial_boots(&self) -> usize {
        match self.env.backend() {
            Backend::Grub => 1,
            _ => self.env.attempts as usize,
        }
    }
}

/// `#[test] fn NAME()` running `scenario` on a fresh rig of the backend, for each pair.
macro_rules! scenario_tests {
    ($scenario:ident: $($name:ident => $backend:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $scenario(&Rig::new(Backend::$backend));
            }
        )*
    };
}

// --- the operations write exactly RAUC's variables -------------------------------------------

/// What the backend says of a slot: in the boot order, good, tries left.
fn boot_state(in_order: bool, good: bool, tries_left: Option<u32>) -> SlotBootState {
    SlotBootState {
        in_order,
        good,
        tries_left,
    }
}

fn counter_operations(rig: &Rig) {
    let bl = &rig.bl;
    // Nothing set yet: the script's defaults (configured order, full budget).
    assert_eq!(rig.primary().as_deref(), Some("A"));
    assert_eq!(bl.slot_state("B").unwrap(), boot_state(true, true, None));

    bl.mark_active("A").unwrap();
    assert_eq!(rig.get("BOOT_ORDER").as_deref(), Some("A B"));
    assert_eq!(rig.get("BOOT_A_LEFT").as_deref(), Some("3"));
    assert_eq!(rig.get("BOOT_B_LEFT"), None);

    bl.mark_active("B").unwrap();
    assert_eq!(rig.get("BOOT_ORDER").as_deref(), Some("B A"));
    assert_eq!(rig.get("BOOT_B_LEFT").as_deref(), Some("3"));
    assert_eq!(rig.primary().as_deref(), Some("B"));
    assert_eq!(bl.slot_state("B").unwrap(), boot_state(true, true, Some(3)));

    rig.set("BOOT_B_LEFT", "1");
    bl.mark_good("B").unwrap();
    assert_eq!(rig.get("BOOT_B_LEFT").as_deref(), Some("3"));
    assert_eq!(rig.get("BOOT_ORDER").as_deref(), Some("B A"));

    bl.mark_bad("B").unwrap();
    assert_eq!(rig.get("BOOT_ORDER").as_deref(), Some("A"));
    assert_eq!(rig.get("BOOT_B_LEFT").as_deref(), Some("0"));
    assert_eq!(rig.primary().as_deref(), Some("A"));
    assert_eq!(
        bl.slot_state("B").unwrap(),
        boot_state(false, false, Some(0))
    );

    // Activating a slot that was marked bad puts it back in front.
    bl.mark_active("B").unwrap();
    assert_eq!(rig.get("BOOT_ORDER").as_deref(), Some("B A"));
    assert_eq!(rig.primary().as_deref(), Some("B"));
}

#[test]
fn uboot_operations_write_boot_order_and_counters() {
    let rig = Rig::uboot();
    counter_operations(&rig);
    assert_eq!(
        rig.env.text(),
        "BOOT_A_LEFT=3\nBOOT_B_LEFT=3\nBOOT_ORDER=B A\nbootdelay=2\n",
        "nothing else was written and the board's own variables are kept"
    );
}

#[test]
fn file_operations_write_boot_order_and_counters() {
    let rig = Rig::file();
    counter_operations(&rig);
    assert_eq!(
        fs::read_to_string(rig.env.file_path()).unwrap(),
        "BOOT_ORDER=B A\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n"
    );
}

#[test]
fn grub_operations_write_order_ok_and_try() {
    let rig = Rig::grub();
    let bl = &rig.bl;
    // A fresh grubenv: every slot is OK=0 as the script presets it, so none is bootable.
    assert_eq!(rig.primary(), None);
    assert_eq!(
        bl.slot_state("A").unwrap(),
        boot_state(true, false, Some(0))
    );

    bl.mark_active("A").unwrap();
    assert_eq!(rig.get("ORDER").as_deref(), Some("A B"));
    assert_eq!(rig.get("A_OK").as_deref(), Some("1"));
    assert_eq!(rig.get("A_TRY").as_deref(), Some("0"));
    assert_eq!(rig.primary().as_deref(), Some("A"));

    bl.mark_active("B").unwrap();
    assert_eq!(rig.get("ORDER").as_deref(), Some("B A"));
    assert_eq!(rig.primary().as_deref(), Some("B"));
    assert_eq!(bl.slot_state("B").unwrap(), boot_state(true, true, Some(1)));

    // After its one try B is no longer primary: GRUB would fall back to A next.
    rig.set("B_TRY", "1");
    assert_eq!(rig.primary().as_deref(), Some("A"));
    assert!(!bl.slot_state("B").unwrap().good);

    bl.mark_good("B").unwrap();
    assert_eq!(rig.get("B_OK").as_deref(), Some("1"));
    assert_eq!(rig.get("B_TRY").as_deref(), Some("0"));
    assert_eq!(rig.primary().as_deref(), Some("B"));

    bl.mark_bad("B").unwrap();
    assert_eq!(rig.get("B_OK").as_deref(), Some("0"));
    assert_eq!(rig.get("B_TRY").as_deref(), Some("0"));
    assert_eq!(
        rig.get("ORDER").as_deref(),
        Some("B A"),
        "mark-bad keeps ORDER"
    );
    assert_eq!(rig.primary().as_deref(), Some("A"));

    assert_eq!(
        rig.env.text(),
        "ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=0\n",
        "nothing else was written"
    );
}

// --- whole cycles with the boot simulator ----------------------------------------------------

/// The device runs on A, committed.
fn start_on_a(rig: &Rig) {
    rig.bl.mark_active("A").unwrap();
    assert_eq!(rig.boot(), "A");
    rig.bl.mark_good("A").unwrap();
    assert_eq!(rig.primary().as_deref(), Some("A"));
}

fn trial_then_commit(rig: &Rig) {
    start_on_a(rig);
    rig.bl.mark_active("B").unwrap();
    assert_eq!(rig.primary().as_deref(), Some("B"));
    assert_eq!(rig.boot(), "B", "the trial boot");
    rig.bl.mark_good("B").unwrap();
    assert_eq!(rig.primary().as_deref(), Some("B"));
    // Every healthy boot is marked good, as rauc-mark-good does.
    for _ in 0..5 {
        assert_eq!(rig.boot(), "B");
        rig.bl.mark_good("B").unwrap();
    }
    assert!(rig.bl.slot_state("B").unwrap().good);
}

/// Boots until something other than `slot` comes up; returns it and how many boots it took.
fn boot_until_not(rig: &Rig, slot: &str) -> (String, usize) {
    for boots in 0..20 {
        let booted = rig.boot();
        if booted != slot {
            return (booted, boots);
        }
    }
    panic!("{slot} kept booting: the script never fell back");
}

fn failed_trial_falls_back(rig: &Rig) {
    start_on_a(rig);
    rig.bl.mark_active("B").unwrap();
    // B never comes up healthy: nobody marks it good.
    let (fallback, trial_boots) = boot_until_not(rig, "B");
    assert_eq!(fallback, "A");
    assert_eq!(trial_boots, rig.trial_boots());
    // The agent, running on A again, records the outcome.
    rig.bl.mark_good("A").unwrap();
    rig.bl.mark_bad("B").unwrap();
    assert_eq!(rig.primary().as_deref(), Some("A"));
    assert!(!rig.bl.slot_state("B").unwrap().good);
    for _ in 0..5 {
        assert_eq!(rig.boot(), "A");
        rig.bl.mark_good("A").unwrap();
    }
}

/// What the scripts do when the agent records nothing after a fallback: sooner or later the
/// failed slot is tried again. The agent must mark it bad.
fn unmarked_failed_slot_is_tried_again(rig: &Rig) {
    start_on_a(rig);
    rig.bl.mark_active("B").unwrap();
    let (fallback, _) = boot_until_not(rig, "B");
    assert_eq!(fallback, "A");
    let (retried, _) = boot_until_not(rig, "A");
    assert_eq!(retried, "B");
}

/// The shipped script's text and the FAT variant's, run by the simulator's interpreter on what
/// the agent writes through fw_setenv: commit, fallback after the tries, mark-bad, and a failed
/// slot the agent leaves unmarked.
#[test]
fn uboot_scripts_as_written_run_the_agents_cycles() {
    for script in [
        UBootScript::EnvInRam(SHIPPED_UBOOT_SCRIPT.into()),
        UBootScript::EnvInFat(FAT_UBOOT_SCRIPT.into()),
    ] {
        trial_then_commit(&Rig::uboot_running(script.clone()));
        failed_trial_falls_back(&Rig::uboot_running(script.clone()));
        unmarked_failed_slot_is_tried_again(&Rig::uboot_running(script.clone()));
        hostile_boot_order(&Rig::uboot_running(script));
    }
}

scenario_tests!(trial_then_commit:
    uboot_trial_boot_then_mark_good_stays_on_new_slot => UBoot,
    grub_trial_boot_then_mark_good_stays_on_new_slot => Grub,
    file_trial_boot_then_mark_good_stays_on_new_slot => File,
);
scenario_tests!(failed_trial_falls_back:
    uboot_failed_trial_falls_back_after_its_tries_and_mark_bad_keeps_it_away => UBoot,
    grub_failed_trial_falls_back_after_one_try_and_mark_bad_keeps_it_away => Grub,
    file_failed_trial_falls_back_after_its_tries_and_mark_bad_keeps_it_away => File,
);
scenario_tests!(unmarked_failed_slot_is_tried_again:
    uboot_unmarked_failed_slot_is_tried_again => UBoot,
    grub_unmarked_failed_slot_is_tried_again => Grub,
);

#[test]
fn fresh_environments_boot_the_first_slot() {
    for rig in [Rig::uboot(), Rig::file()] {
        assert_eq!(rig.primary().as_deref(), Some("A"));
        assert_eq!(rig.boot(), "A");
        assert_eq!(rig.get("BOOT_A_LEFT").as_deref(), Some("2"));
    }
    // GRUB has no bootable slot in a fresh grubenv and boots menu entry 0.
    let rig = Rig::grub();
    assert_eq!(rig.primary(), None);
    assert_eq!(rig.boot(), "A");
}

/// A device running B installs into A: A is marked bad before its first byte is written. If
/// B's try flag is still set when the power fails mid-write (say a cut in the boot before
/// `boot-check` marked it good), no slot qualifies at the next power-on. GRUB's last resort
/// must be the good slot B, not menu entry 0 — the half-written A.
#[test]
fn grub_last_resort_never_boots_a_slot_marked_bad() {
    let rig = Rig::grub();
    rig.bl.mark_active("B").unwrap();
    assert_eq!(rig.boot(), "B");
    rig.bl.mark_bad("A").unwrap();
    assert_eq!(rig.get("B_TRY").as_deref(), Some("1"));
    for _ in 0..3 {
        assert_eq!(rig.boot(), "B", "{:?}", rig.get("A_OK"));
    }
    // With no good slot at all, entry 0 is all GRUB has left.
    rig.bl.mark_bad("B").unwrap();
    assert_eq!(rig.boot(), "A");
}

// --- hostile and broken environments ---------------------------------------------------------

fn hostile_boot_order(rig: &Rig) {
    let junk: Vec<String> = (0..2000).map(|i| format!("X{i}")).collect();
    let order = format!("{} ;reset $(reboot) A=B B A", junk.join(" "));
    assert!(order.len() > 10 * 1024);
    rig.set("BOOT_ORDER", &order);
    rig.set("BOOT_B_LEFT", "2");
    // Words that are not configured slots are passed over, as the script does.
    assert_eq!(rig.primary().as_deref(), Some("B"));
    assert_eq!(
        rig.bl.slot_state("B").unwrap(),
        boot_state(true, true, Some(2))
    );
    assert_eq!(rig.boot(), "B");

    rig.bl.mark_active("A").unwrap();
    let written = rig.get("BOOT_ORDER").unwrap();
    assert!(written.starts_with("A X0 X1 "), "{written}");
    assert_eq!(written.split(' ').count(), 16, "{written}");
    assert!(!written.contains(';') && !written.contains('$'));
    assert_eq!(rig.boot(), "A");
}

scenario_tests!(hostile_boot_order:
    uboot_hostile_boot_order_is_walked_safely_and_rewritten_bounded => UBoot,
    file_hostile_boot_order_is_walked_safely_and_rewritten_bounded => File,
);

fn counters_that_are_not_numbers(rig: &Rig) {
    rig.bl.mark_active("B").unwrap();
    for bad in ["zz", "0x3", "-1", "3 tries", &"3".repeat(10 * 1024)] {
        rig.set("BOOT_B_LEFT", bad);
        let err = rig.bl.primary().unwrap_err();
        assert!(
            matches!(err, BootloaderError::Malformed { .. }),
            "{bad:?}: {err}"
        );
        let text = err.to_string();
        assert!(text.contains("BOOT_B_LEFT"), "{text}");
        assert!(text.len() < 600, "the message is bounded: {text}");
        assert!(rig.bl.slot_state("B").is_err());
        assert!(rig.bl.slot_state("A").is_ok());
    }
    // Marking rewrites the counter, and everything works again.
    rig.bl.mark_good("B").unwrap();
    assert_eq!(rig.primary().as_deref(), Some("B"));
}

scenario_tests!(counters_that_are_not_numbers:
    uboot_counter_that_is_not_a_number_is_a_clean_error => UBoot,
    file_counter_that_is_not_a_number_is_a_clean_error => File,
);

#[test]
fn grub_hostile_values_are_clean_errors_or_passed_over() {
    let rig = Rig::grub();
    rig.assert_activated_then_refused("B_OK", "yes", "B_OK");
    rig.bl.mark_good("B").unwrap();
    assert_eq!(rig.primary().as_deref(), Some("B"));

    // As much junk as fits in the 1 KiB block.
    let junk: Vec<String> = (0..150).map(|i| format!("J{i}")).collect();
    rig.set("ORDER", &format!("{} B A", junk.join(" ")));
    assert_eq!(rig.primary().as_deref(), Some("B"));
    rig.bl.mark_active("A").unwrap();
    let written = rig.get("ORDER").unwrap();
    assert!(written.starts_with("A J0 "), "{written}");
    assert_eq!(written.split(' ').count(), 16);
}

#[test]
fn uboot_value_imitating_a_variable_is_refused() {
    let rig = Rig::uboot();
    // A newline in some other value makes fw_printenv print a second BOOT_B_LEFT line.
    rig.assert_activated_then_refused("hostname", "gw\nBOOT_B_LEFT=9", "listed twice");
}

#[test]
fn uboot_environment_listing_larger_than_the_bound_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let env = BootEnv::uboot(dir.path(), 0x20000).unwrap();
    let script = dir.path().join("fill");
    let line = "v".repeat(900);
    let text: String = (0..100).map(|i| format!("FILL{i}={line}\n")).collect();
    fs::write(&script, text).unwrap();
    run_ok(
        std::process::Command::new(env.setter().unwrap())
            .arg("-c")
            .arg(env.uboot_config().unwrap())
            .arg("-s")
            .arg(&script),
    )
    .unwrap();
    assert!(env.text().len() > update_agent::bootloader::MAX_TOOL_OUTPUT);
    let rig = Rig::on(dir, env);
    assert!(matches!(
        rig.bl.primary(),
        Err(BootloaderError::OutputTooLarge { .. })
    ));
}

#[test]
fn file_garbage_is_a_clean_error() {
    let rig = Rig::file();
    let path = rig.env.file_path();
    for garbage in [
        &b"\xff\xfe\x00garbage"[..],
        b"BOOT_ORDER=A B\nBOOT_ORDER=B A\n",
    ] {
        fs::write(path, garbage).unwrap();
        assert!(matches!(
            rig.bl.primary(),
            Err(BootloaderError::Malformed { .. })
        ));
    }
    fs::write(path, vec![b'x'; update_agent::bootloader::MAX_ENV_FILE + 1]).unwrap();
    assert!(rig.bl.primary().is_err());
}

#[test]
fn uboot_unreadable_environment_is_a_clean_error_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let env = BootEnv::uboot_erased(dir.path(), UBOOT_ENV_SIZE).unwrap();
    let config = env.uboot_config().unwrap().display().to_string();
    let rig = Rig::on(dir, env);
    let err = rig.bl.primary().unwrap_err();
    assert!(matches!(err, BootloaderError::ToolFailed { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("check {config}")), "{text}");
    assert!(text.contains("Cannot read"), "the tool's own words: {text}");
}

#[test]
fn grub_missing_grubenv_is_reported_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let editenv = require("grub-editenv", "grub-common");
    let grubenv = dir.path().join("boot/grub/grubenv");
    let bl = from_config(
        &slots(),
        &BootloaderConfig::Grub {
            grub_editenv: editenv,
            grubenv: grubenv.clone(),
        },
    )
    .unwrap();
    let err = bl.mark_active("B").unwrap_err();
    assert!(err.to_string().contains("create"), "{err}");
    assert!(bl.primary().is_err());
    assert!(!grubenv.exists());
}

#[test]
fn a_tool_that_reports_success_without_writing_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let env = BootEnv::uboot(dir.path(), UBOOT_ENV_SIZE).unwrap();
    let fake = dir.path().join("fw_setenv");
    fs::write(&fake, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let BootloaderConfig::Uboot {
        fw_env_config,
        attempts,
        fw_printenv,
        ..
    } = env.config()
    else {
        unreachable!("a U-Boot environment")
    };
    let config = BootloaderConfig::Uboot {
        fw_env_config,
        attempts,
        fw_printenv,
        fw_setenv: fake,
    };
    let bl = from_config(&slots(), &config).unwrap();
    let err = bl.mark_active("B").unwrap_err();
    assert!(matches!(err, BootloaderError::NotApplied { .. }), "{err}");
}

#[test]
fn bad_or_unknown_bootnames_are_refused_before_anything_is_written() {
    let rig = Rig::uboot();
    let before = rig.env.text();
    for name in ["C", "A\nBOOT_B_LEFT=9", "A B", "", "A=1", "B;reset"] {
        assert!(rig.bl.mark_active(name).is_err(), "{name:?}");
        assert!(rig.bl.mark_good(name).is_err(), "{name:?}");
        assert!(rig.bl.mark_bad(name).is_err(), "{name:?}");
        assert!(rig.bl.slot_state(name).is_err(), "{name:?}");
    }
    assert!(matches!(
        rig.bl.mark_active("C"),
        Err(BootloaderError::UnknownSlot { .. })
    ));
    assert_eq!(rig.env.text(), before);
}

#[test]
fn from_config_refuses_bad_settings_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothere");
    let uboot = |fw_printenv: &str, fw_env_config: Option<PathBuf>| BootloaderConfig::Uboot {
        fw_env_config,
        attempts: 3,
        fw_printenv: fw_printenv.into(),
        fw_setenv: "/usr/bin/fw_setenv".into(),
    };
    let file = |attempts| BootloaderConfig::File {
        path: missing.clone(),
        attempts,
    };
    let mut cases: Vec<(Vec<String>, BootloaderConfig, &str)> = [
        (uboot(missing.to_str().unwrap(), None), "libubootenv-tool"),
        (
            uboot("/usr/bin/fw_printenv", Some(missing.clone())),
            "fw_env_config",
        ),
        (
            BootloaderConfig::Grub {
                grubenv: missing.clone(),
                grub_editenv: missing.clone(),
            },
            "grub-common",
        ),
        (file(0), "attempts"),
        (file(10), "attempts"),
    ]
    .into_iter()
    .map(|(config, expected)| (slots().to_vec(), config, expected))
    .collect();
    // The file backend with good settings, and the slots wrong.
    let names = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    cases.extend([
        (names(&["A", "A"]), file(3), "twice"),
        (names(&[]), file(3), "slots"),
        (names(&["A", "B;reset"]), file(3), "letters and digits"),
    ]);
    for (slots, config, expected) in cases {
        let err = from_config(&slots, &config).err().expect("refused");
        assert!(
            err.to_string().contains(expected),
            "{slots:?} {config:?}: {err}"
        );
    }
}

#[test]
fn settings_read_from_toml_with_defaults() {
    let config: BootloaderConfig =
        toml::from_str("backend = \"uboot\"\nfw_env_config = \"/etc/fw_env.config\"\n").unwrap();
    let BootloaderConfig::Uboot {
        fw_env_config,
        attempts,
        fw_printenv,
        fw_setenv,
    } = config
    else {
        panic!("not U-Boot: {config:?}");
    };
    assert_eq!(fw_env_config, Some(PathBuf::from("/etc/fw_env.config")));
    assert_eq!(attempts, 3);
    assert_eq!(fw_printenv, PathBuf::from("/usr/bin/fw_printenv"));
    assert_eq!(fw_setenv, PathBuf::from("/usr/bin/fw_setenv"));
    for refused in [
        "backend = \"uboot\"\natempts = 3\n",
        // The file backend cannot be chosen without its file.
        "backend = \"file\"\n",
    ] {
        assert!(
            toml::from_str::<BootloaderConfig>(refused).is_err(),
            "{refused}"
        );
    }
    let kinds: std::collections::BTreeMap<String, BootloaderKind> =
        toml::from_str("a = \"uboot\"\nb = \"grub\"\nc = \"file\"\n").unwrap();
    assert_eq!(
        kinds.into_values().collect::<Vec<_>>(),
        [
            BootloaderKind::UBoot,
            BootloaderKind::Grub,
            BootloaderKind::File
        ]
    );
}

// --- the shipped boot scripts ----------------------------------------------------------------

#[test]
fn shipped_grub_cfg_is_a_valid_grub_script() {
    let check = require("grub-script-check", "grub-common");
    run_ok(
        std::process::Command::new(check)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/boot/grub.cfg")),
    )
    .unwrap();
}

#[test]
fn shipped_uboot_scripts_use_the_default_attempts() {
    let attempts = DEFAULT_BOOT_ATTEMPTS;
    for script in [SHIPPED_UBOOT_SCRIPT, FAT_UBOOT_SCRIPT] {
        for slot in ["A", "B"] {
            let line = format!("setenv BOOT_{slot}_LEFT {attempts}");
            // Once as the default for an unset counter, once when no slot has a try left.
            assert_eq!(script.matches(&line).count(), 2, "{line}");
        }
    }
}

/// The FAT script counts down by comparing with the hex digits; the agent's try budget must be
/// one of them (see the script's header).
#[test]
fn default_attempts_fit_the_fat_scripts_digits() {
    let attempts = DEFAULT_BOOT_ATTEMPTS;
    assert!((1..=15).contains(&attempts));
    assert!(FAT_UBOOT_SCRIPT.contains("for ua_digit in 0 1 2 3 4 5 6 7 8 9 a b c d e f; do"));
}
