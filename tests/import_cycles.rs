//! No import cycles between the modules of either crate of the workspace (the agent, `src/`, and
//! its core, `core/src/`): the layering ARCHITECTURE.md describes is checked, not claimed. Between
//! the two crates cargo forbids a cycle itself (the core cannot depend on the agent). The nodes
//! are the top-level modules of a crate's `src/` and the submodules of `cli` (each subcommand); an edge is any `crate::…` path (in a `use` or inline) or, inside
//! `cli`, a `super::…` path that names another module. Test code (`#[cfg(test)]` items, `tests.rs`
//! files and `tests/` directories) is left out: a unit test may reach across. A module using
//! its own parent (a `cli` subcommand using `cli`'s exit codes) is not an edge: the parent
//! contains the child.
//!
//! The test fails naming every cycle (strongly connected set of modules) with the lines that
//! make its edges.
//!
//! That the engine and the release types do no IO is no longer read from their text: they live
//! in the core crate, which is `no_std` and whose dependencies are built without std;
//! [`the_core_crate_cannot_do_io`] checks that this stays so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules whose submodules are nodes of their own.
const SPLIT: &[&str] = &["cli"];

/// Where an edge comes from: `file:line`.
type Evidence = BTreeMap<(String, String), Vec<String>>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "tests" {
                sources(&path, out);
            }
        } else if name.ends_with(".rs") && name != "tests.rs" {
            out.push(path);
        }
    }
}

/// The module path of a file relative to `src/`: `cli/release.rs` is `["cli", "release"]`,
/// `mqtt/mod.rs` is `["mqtt"]`, `lib.rs` and `main.rs` are the crate root (`[]`).
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap();
    let stem = file.trim_end_matches(".rs");
    if stem != "mod" && !(parts.is_empty() && (stem == "lib" || stem == "main")) {
        parts.push(stem.to_owned());
    }
    parts
}

/// The graph node a module path belongs to.
fn node(path: &[String]) -> Option<String> {
    let first = path.first()?;
    match path.get(1) {
        Some(second) if SPLIT.contains(&first.as_str()) => Some(format!("{first}::{second}")),
        _ => Some(first.clone()),
    }
}

/// The source with comments, string and char literals blanked (newlines kept, so offsets still
/// give line numbers).
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if (c == 'r' || c == 'b')
            && !chars[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
            && raw_string_start(&chars[i..]).is_some()
        {
            let (prefix, hashes) = raw_string_start(&chars[i..]).unwrap();
            for _ in 0..prefix {
                out.push(' ');
            }
            i += prefix;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '"' && chars[i + 1..].iter().take(hashes).all(|h| *h == '#') {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a, which has no closing quote).
            let end = if next == Some('\\') {
                chars[i + 2..]
                    .iter()
                    .position(|c| *c == '\'')
                    .map(|p| i + 2 + p)
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// `r"`, `r#"`, `br##"`: the length of the opening and the number of `#`.
fn raw_string_start(chars: &[char]) -> Option<(usize, usize)> {
    let mut i = 0;
    if chars.first() == Some(&'b') {
        i += 1;
    }
    if chars.get(i) != Some(&'r') {
        return None;
    }
    i += 1;
    let hashes = chars[i..].iter().take_while(|c| **c == '#').count();
    i += hashes;
    (chars.get(i) == Some(&'"')).then_some((i + 1, hashes))
}

/// The code with every item under `#[cfg(test)]` blanked.
fn without_test_items(code: &str) -> String {
    let mut out: Vec<char> = code.chars().collect();
    let text: String = code.to_owned();
    let marker = "#[cfg(test)]";
    let mut search = 0;
    while let Some(found) = text[search..].find(marker) {
        let start = search + found;
        // Byte offsets equal char offsets only for ASCII; map through char indices.
        let start_char = text[..start].chars().count();
        let mut i = start_char;
        let mut depth = 0i32;
        let mut entered = false;
        while i < out.len() {
            let c = out[i];
            match c {
                '{' => {
                    depth += 1;
                    entered = true;
                }
                '}' => depth -= 1,
                ';' if depth == 0 && i > start_char + marker.len() => {
                    if c != '\n' {
                        out[i] = ' ';
                    }
                    break;
                }
                _ => {}
            }
            if c != '\n' {
                out[i] = ' ';
            }
            i += 1;
            if entered && depth == 0 {
                break;
            }
        }
        search = start + marker.len();
    }
    out.into_iter().collect()
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths a `crate::`/`super::` prefix at `chars[i..]` names, each as its segments (only
/// the first two matter). `use crate::{a::b, c::{d, e}}` gives `[a, b]`, `[c, d]`, `[c, e]`.
fn paths_at(chars: &[char], mut i: usize) -> Vec<Vec<String>> {
    fn skip_ws(chars: &[char], i: &mut usize) {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    }
    fn tree(chars: &[char], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        skip_ws(chars, i);
        if chars.get(*i) == Some(&'{') {
            *i += 1;
            loop {
                skip_ws(chars, i);
                match chars.get(*i) {
                    Some('}') | None => {
                        *i += 1;
                        return;
                    }
                    Some(',') => *i += 1,
                    _ => tree(chars, i, prefix.clone(), out),
                }
            }
        }
        let start = *i;
        while *i < chars.len() && is_ident(chars[*i]) {
            *i += 1;
        }
        if start == *i {
            // `*` or something that is not a path: the prefix is what is named.
            if chars.get(*i) == Some(&'*') {
                *i += 1;
            }
            out.push(prefix);
            return;
        }
        let mut path = prefix;
        path.push(chars[start..*i].iter().collect());
        skip_ws(chars, i);
        if chars.get(*i) == Some(&':') && chars.get(*i + 1) == Some(&':') {
            *i += 2;
            tree(chars, i, path, out);
        } else {
            // `as name`, generics, a call: the path ends here.
            out.push(path);
        }
    }
    let mut out = Vec::new();
    tree(chars, &mut i, Vec::new(), &mut out);
    out
}

/// The crates of the workspace, by the directory that holds their `src/`.
const CRATES: &[&str] = &[".", "core"];

fn graph(krate: &str) -> Evidence {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(krate)
        .join("src");
    let shown_root = Path::new(krate).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    files.sort();
    let mut edges = Evidence::new();
    for file in files {
        let relative = file.strip_prefix(&root).unwrap().to_path_buf();
        let module = module_of(&relative);
        let Some(from) = node(&module) else { continue };
        let source = std::fs::read_to_string(&file).unwrap();
        let code = without_test_items(&code_only(&source));
        let chars: Vec<char> = code.chars().collect();
        for (prefix, relative_to) in [("crate::", None), ("super::", Some(()))] {
            let prefix_chars: Vec<char> = prefix.chars().collect();
            let mut i = 0;
            while i + prefix_chars.len() <= chars.len() {
                let here = chars[i..i + prefix_chars.len()] == prefix_chars[..]
                    && (i == 0
                        || !(is_ident(chars[i - 1]) || chars[i - 1] == ':' || chars[i - 1] == '$'));
                if !here {
                    i += 1;
                    continue;
                }
                let line = chars[..i].iter().filter(|c| **c == '\n').count() + 1;
                for path in paths_at(&chars, i + prefix_chars.len()) {
                    let absolute: Vec<String> = match relative_to {
                        None => path,
                        Some(()) => {
                            // `super::` of `a/b.rs` (module `a::b`) is `a`; of `a/b/mod.rs` too
                            // (module `a::b`, parent `a`).
                            let mut parent = module.clone();
                            if parent.pop().is_none() {
                                continue;
                            }
                            parent.extend(path);
                            parent
                        }
                    };
                    let Some(to) = node(&absolute) else { continue };
                    let contains = |outer: &str, inner: &str| {
                        inner
                            .strip_prefix(outer)
                            .is_some_and(|rest| rest.starts_with("::"))
                    };
                    if to == from || contains(&to, &from) || contains(&from, &to) {
                        continue;
                    }
                    let place = format!("{}:{line}", shown_root.join(&relative).display());
                    let lines = edges.entry((from.clone(), to)).or_default();
                    if !lines.contains(&place) {
                        lines.push(place);
                    }
                }
                i += prefix_chars.len();
            }
        }
    }
    edges
}

/// Tarjan's strongly connected components with more than one node.
fn cycles(edges: &Evidence) -> Vec<Vec<String>> {
    struct Walk<'a> {
        next: BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(walk: &mut Walk<'a>, v: &'a str) {
        let n = walk.index.len();
        walk.index.insert(v, n);
        walk.low.insert(v, n);
        walk.stack.push(v);
        walk.on_stack.insert(v);
        for w in walk.next.get(v).cloned().unwrap_or_default() {
            if !walk.index.contains_key(w) {
                visit(walk, w);
                let low = walk.low[v].min(walk.low[w]);
                walk.low.insert(v, low);
            } else if walk.on_stack.contains(w) {
                let low = walk.low[v].min(walk.index[w]);
                walk.low.insert(v, low);
            }
        }
        if walk.low[v] == walk.index[v] {
            let mut component = Vec::new();
            loop {
                let w = walk.stack.pop().unwrap();
                walk.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                walk.found.push(component);
            }
        }
    }
    let mut walk = Walk {
        next: BTreeMap::new(),
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for (from, to) in edges.keys() {
        walk.next.entry(from).or_default().push(to);
        walk.next.entry(to).or_default();
    }
    let nodes: Vec<&str> = walk.next.keys().copied().collect();
    for v in nodes {
        if !walk.index.contains_key(v) {
            visit(&mut walk, v);
        }
    }
    walk.found.sort();
    walk.found
}

#[test]
fn no_import_cycle_between_modules() {
    let mut report = String::new();
    for krate in CRATES {
        let edges = graph(krate);
        assert!(edges.len() > 5, "{krate}: only {} edges read", edges.len());
        for component in &cycles(&edges) {
            report.push_str(&format!(
                "cycle in {krate} among {}:\n",
                component.join(", ")
            ));
            for ((from, to), lines) in &edges {
                if component.contains(from) && component.contains(to) {
                    report.push_str(&format!("  {from} -> {to}: {}\n", lines.join(" ")));
                }
            }
        }
    }
    assert!(report.is_empty(), "import cycles:\n{report}");
}

/// The core's dependencies (normal and build), each built without its default features and
/// without `std`: what the core can call is what `core` and `alloc` allow. A new dependency has
/// to be added here, with the same care, or this test fails.
const CORE_MAY_DEPEND_ON: &[&str] = &[
    "base64",
    "ed25519-dalek",
    "hex",
    "jiff",
    "serde",
    "serde_json",
    "sha2",
    "thiserror",
    "url",
];

/// The engine and the release types cannot do IO or read a clock, and the compiler, not a
/// reading of their text, is what stops them: the core crate is `no_std` outside its unit tests
/// (so `std::fs`, `std::net`, `std::process`, `std::thread`, `std::env` and `std::time` do not
/// exist in it) and its dependencies are the listed ones, built without `std` (so jiff has no
/// `Timestamp::now` and no time zone database, url no `socket_addrs`, and tokio, nix or any
/// other crate with IO is not there at all). CI also builds the core on its own
/// (`cargo clippy -p update-agent-core`), where no other package turns those features on.
#[test]
fn the_core_crate_cannot_do_io() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("core/src/lib.rs")).unwrap();
    assert!(
        lib.lines()
            .any(|line| line.trim() == "#![cfg_attr(not(test), no_std)]"),
        "core/src/lib.rs must stay `#![cfg_attr(not(test), no_std)]`"
    );
    let mut files = Vec::new();
    sources(&root.join("core/src"), &mut files);
    assert!(files.len() > 10, "the core's files: {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let code = without_test_items(&code_only(&std::fs::read_to_string(file).unwrap()));
        for (number, line) in code.lines().enumerate() {
            if line.contains("extern crate std") || line.contains("::std::") {
                found.push(format!(
                    "{}:{}: {}",
                    file.display(),
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the core links std:\n{}",
        found.join("\n")
    );

    let metadata = update_agent::sim::tools::run_ok(
        std::process::Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .arg("--manifest-path")
            .arg(root.join("Cargo.toml")),
    )
    .unwrap();
    let metadata: serde_json::Value = serde_json::from_str(&metadata).unwrap();
    let core = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|package| package["name"] == "update-agent-core")
        .expect("the workspace has the package update-agent-core");
    let mut wrong = Vec::new();
    let mut checked = 0;
    for dependency in core["dependencies"].as_array().unwrap() {
        if dependency["kind"] == "dev" {
            continue; // the unit tests run with std
        }
        checked += 1;
        let name = dependency["name"].as_str().unwrap();
        let features: Vec<&str> = dependency["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect();
        if !CORE_MAY_DEPEND_ON.contains(&name) {
            wrong.push(format!("{name} is not one of the core's dependencies"));
        }
        if dependency["uses_default_features"] != false {
            wrong.push(format!("{name} must have default-features = false (std)"));
        }
        if let Some(std) = features
            .iter()
            .find(|f| f.contains("std") || f.starts_with("tz"))
        {
            wrong.push(format!("{name} has the feature {std}"));
        }
    }
    assert!(wrong.is_empty(), "core/Cargo.toml:\n{}", wrong.join("\n"));
    assert_eq!(checked, CORE_MAY_DEPEND_ON.len(), "the core's dependencies");
}

/// The checker finds what it is meant to find: grouped `use` trees, `super::` inside `cli`,
/// inline paths; and ignores comments, strings and test items.
#[test]
fn the_checker_reads_paths_as_written() {
    let code = code_only(
        "use crate::{a::b, c::{d, e}};\n\
         // crate::commented::out\n\
         let s = \"crate::in_a_string\";\n\
         let r = r#\"crate::raw\"#;\n\
         let c = '\"'; fn f<'a>(x: &'a crate::f::G) {}\n\
         #[cfg(test)]\nmod tests { use crate::only_in_tests; }\n\
         #[cfg(test)]\nuse crate::test_import;\n\
         use crate::h as i;\n",
    );
    let code = without_test_items(&code);
    let chars: Vec<char> = code.chars().collect();
    let mut named = Vec::new();
    let mut i = 0;
    while let Some(found) = code[i..].find("crate::") {
        let at = code[..i + found].chars().count();
        named.extend(
            paths_at(&chars, at + "crate::".len())
                .into_iter()
                .map(|p| p.join("::")),
        );
        i += found + "crate::".len();
    }
    assert_eq!(named, ["a::b", "c::d", "c::e", "f::G", "h"]);
    assert_eq!(
        node(&module_of(Path::new("cli/release_create.rs"))),
        Some("cli::release_create".to_owned())
    );
    assert_eq!(
        node(&module_of(Path::new("mqtt/link.rs"))),
        Some("mqtt".to_owned())
    );
    assert_eq!(node(&module_of(Path::new("lib.rs"))), None);
}
