//! `status` and `mark`: what the device runs and what its bootloader will do, and the manual
//! bootloader changes RAUC users know as `rauc status mark-good|mark-bad|mark-active`.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;
use update_agent::config::Config;
use update_agent::engine::Phase;
use update_agent::release::escape_for_log;
use update_agent::state_store::StateStore;
use update_agent::system;

use super::install::{DEFAULT_CONFIG, describe};

#[derive(clap::Args)]
pub struct StatusArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[arg(long)]
    json: bool,
    /// Keep showing changes (state, progress bar while writing, signals) until interrupted;
    /// needs the running agent
    #[arg(long)]
    follow: bool,
    /// Read the state on disk even when the agent runs
    #[arg(long, conflicts_with = "follow")]
    offline: bool,
}

#[derive(clap::Args)]
pub struct MarkArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[arg(value_enum)]
    how: Mark,
    #[arg(value_enum)]
    which: Which,
    /// Allow `mark active` on a slot whose content the agent did not write and verify
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Mark {
    Good,
    Bad,
    Active,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Which {
    Booted,
    Other,
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    if !args.offline {
        if let Some(code) = super::user::status(args.json, args.follow)? {
            return Ok(code);
        }
        eprintln!("note: the update agent is not running; showing the state on disk");
    }
    let config = Config::load(&args.config)?;
    // Read only: root may look at the daemon's state without taking it over.
    let store = StateStore::existing(&config.device.state_dir);
    let state = store.load()?;
    let bootloader = update_agent::bootloader::open(&config)?;
    let booted = system::booted_slot(&config).ok();
    let primary = bootloader.primary()?;
    let mut slots = Vec::new();
    for slot in [&config.slots.a, &config.slots.b] {
        let boot_state = bootloader.slot_state(&slot.bootname)?;
        let record = state.slots.get(&slot.bootname);
        let version = record.map(|r| r.version.clone()).or_else(|| {
            (booted.as_deref() == Some(slot.bootname.as_str()))
                .then(|| config.device.factory_version.clone())
                .flatten()
        });
        slots.push(json!({
            "bootname": slot.bootname,
            "device": slot.device,
            "booted": booted.as_deref() == Some(slot.bootname.as_str()),
            "primary": primary.as_deref() == Some(slot.bootname.as_str()),
            "bootloader": boot_state,
            "version": version,
            "release_id": record.map(|r| r.release_id),
            "sha256": record.map(|r| r.sha256.clone()),
            "committed": record.map(|r| r.committed),
        }));
    }
    let waiting = match &state.phase {
        Phase::Pending { waiting, until, .. } => Some((*waiting, *until)),
        Phase::RebootScheduled { waiting, at, .. } => Some((*waiting, *at)),
        _ => None,
    };
    let events = store.events()?;
    let recent: Vec<_> = events.iter().rev().take(5).rev().collect();
    if args.json {
        let out = json!({
            "compatible": config.device.compatible,
            "booted": booted,
            "primary": primary,
            "phase": state.phase.name(),
            "transaction": state.phase.transaction(),
            "waiting": waiting.map(|(why, _)| why),
            "until": waiting.and_then(|(_, until)| until),
            "floor": config.trust.floor.max(state.floor),
            "slots": slots,
            "last": state.last,
            "recent_events": recent,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("compatible:   {}", config.device.compatible);
    println!("booted slot:  {}", booted.as_deref().unwrap_or("unknown"));
    println!(
        "next boot:    {}",
        primary.as_deref().unwrap_or("no bootable slot!")
    );
    println!("phase:        {}", state.phase.name());
    if let Some(txn) = state.phase.transaction() {
        println!(
            "transaction:  {} → {} into slot {}",
            txn.id,
            escape_for_log(txn.to_version(), 64),
            txn.to_slot
        );
    }
    if let Some((why, until)) = waiting {
        println!(
            "waiting:      {}{}",
            why.as_str(),
            until.map(|u| format!(" until {u}")).unwrap_or_default()
        );
    }
    println!(
        "floor:        security version {}",
        config.trust.floor.max(state.floor)
    );
    for slot in &slots {
        let boot = &slot["bootloader"];
        let boot_text = format!(
            "{}{}",
            if boot["good"] == true {
                "good"
            } else {
                "not bootable"
            },
            boot["tries_left"]
                .as_u64()
                .map(|n| format!(", {n} tries left"))
                .unwrap_or_default()
        );
        println!(
            "slot {}: {}{}{} version {} ({}); bootloader: {}",
            slot["bootname"].as_str().unwrap_or("?"),
            slot["device"].as_str().unwrap_or("?"),
            if slot["booted"] == true {
                " [booted]"
            } else {
                ""
            },
            if slot["primary"] == true {
                " [next]"
            } else {
                ""
            },
            slot["version"]
                .as_str()
                .map(|v| escape_for_log(v, 64))
                .unwrap_or("unknown".into()),
            match slot["committed"].as_bool() {
                Some(true) => "committed",
                Some(false) => "not committed",
                None => "not written by the agent",
            },
            boot_text,
        );
    }
    if let Some(last) = &state.last {
        println!(
            "last:         {} {} at {}{}",
            last.txn,
            last.result.as_str(),
            last.at,
            last.reason.map(|r| format!(" ({r})")).unwrap_or_default()
        );
    }
    for event in recent {
        println!("  {}", describe(event));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn mark(args: MarkArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let booted = system::booted_slot(&config)?;
    let slot = match args.which {
        Which::Booted => booted.clone(),
        Which::Other => [&config.slots.a, &config.slots.b]
            .into_iter()
            .map(|s| s.bootname.clone())
            .find(|name| *name != booted)
            .expect("two distinct slots are configured"),
    };
    let bootloader = update_agent::bootloader::open(&config)?;
    match args.how {
        Mark::Good => bootloader.mark_good(&slot)?,
        Mark::Bad => {
            if slot == booted && !args.force {
                anyhow::bail!(
                    "slot {slot} is the booted one; marking it bad makes the next boot fall back. Add --force if that is what you want"
                );
            }
            bootloader.mark_bad(&slot)?
        }
        Mark::Active => {
            let state = StateStore::existing(&config.device.state_dir).load()?;
            let verified = state.slots.contains_key(&slot) || slot == booted;
            if !verified && !args.force {
                anyhow::bail!(
                    "slot {slot} holds nothing the agent wrote and verified; booting it may not work. Add --force to activate it anyway"
                );
            }
            bootloader.mark_active(&slot)?
        }
    }
    println!(
        "marked slot {slot} {}",
        match args.how {
            Mark::Good => "good",
            Mark::Bad => "bad",
            Mark::Active => "active",
        }
    );
    Ok(ExitCode::SUCCESS)
}
