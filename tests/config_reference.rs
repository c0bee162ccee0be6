//! The configuration as documented and as shipped: every key of the annotated example
//! `config/agent.toml` has a row in the README's configuration reference, and every
//! `agent.toml` the Yocto layer installs is a config the agent accepts.

use std::path::{Path, PathBuf};

use update_agent::config::Config;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Dotted paths of every key, tables included (`slots.a.device`).
fn keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => keys(&path, inner, out),
            _ => out.push(path),
        }
    }
}

/// The key column of the reference table: each `` `a.b` `` between the first two `|` of a row.
fn documented_keys(readme: &str) -> Vec<String> {
    let reference = readme
        .split("### Configuration reference")
        .nth(1)
        .expect("README.md has a '### Configuration reference' section");
    let mut documented = Vec::new();
    for line in reference
        .lines()
        .take_while(|line| !line.starts_with("## "))
    {
        let Some(cell) = line
            .strip_prefix('|')
            .and_then(|rest| rest.split('|').next())
        else {
            continue;
        };
        documented.extend(
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(|key| key.trim().to_string()),
        );
    }
    documented
}

#[test]
fn every_key_of_the_example_config_is_in_the_readme_reference() {
    let example = std::fs::read_to_string(repo().join("config/agent.toml")).unwrap();
    let table: toml::Table = example.parse().expect("config/agent.toml is TOML");
    let mut all = Vec::new();
    keys("", &table, &mut all);
    assert!(all.len() > 20, "found only {all:?}");

    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let documented = documented_keys(&readme);
    let missing: Vec<_> = all.iter().filter(|key| !documented.contains(key)).collect();
    assert!(
        missing.is_empty(),
        "keys of config/agent.toml missing from the README's configuration reference: {missing:?}"
    );
}

#[test]
fn the_example_config_and_the_yocto_layers_configs_parse() {
    let mut configs = vec![repo().join("config/agent.toml")];
    fn find(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                find(&path, out);
            } else if path.file_name().is_some_and(|name| name == "agent.toml") {
                out.push(path);
            }
        }
    }
    find(&repo().join("yocto"), &mut configs);
    assert!(configs.len() >= 4, "found only {configs:?}");
    for path in configs {
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = Config::parse(&text) {
            panic!("{}: {e}", path.display());
        }
    }
}
