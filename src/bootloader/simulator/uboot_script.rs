//! U-Boot boot scripts run as U-Boot would run them: the subset of U-Boot's hush and commands
//! that `config/boot/uboot-boot.cmd` and `config/boot/uboot-fat-boot.cmd` use, so that the
//! simulator can run the scripts' own text against an environment instead of restating their
//! rules. What it knows:
//!
//! - words, `"double quotes"`, `${name}` (unset is empty; unquoted it splits into words, and a
//!   `for` list splits quoted ones too, as U-Boot's hush does), `#` comments, `;` and newlines;
//! - `if … then … [elif … then …] [else …] fi`, `for NAME in WORDS; do … done`, `&&`, `||`;
//! - `setenv NAME [VALUE …]`, `test` (`-n`, `-z`, `=`, `!=`, `-gt`, `-lt`, `-eq`, `-ne`;
//!   numbers as `simple_strtol(…, 0)` reads them: `0x` hex, else decimal, up to the first other
//!   character), `setexpr NAME A OP B` (`+`, `-`, hex in and out), `echo`, `saveenv`, `reset`;
//! - the FAT environment: `fatload DEV PART ADDR FILE` of a file named `*.env` loads the stored
//!   environment into memory at ADDR (any other load is the kernel's and succeeds), `env import
//!   -c ADDR SIZE [NAME …]`, `env export -c -s SIZE ADDR [NAME …]`, `fatwrite DEV PART ADDR FILE
//!   SIZE` of that memory;
//! - `load`, `ext4load` and `fatload` of other files succeed; `booti`, `bootz`, `bootm` and
//!   `zboot` boot the slot that `rauc.slot=` in `bootargs` names.
//!
//! Anything else is an error, so a script that grows a command the simulator does not model
//! fails the tests instead of being passed over.

use std::collections::BTreeMap;

/// How a run of the script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A boot command ran; `bootargs` named this slot.
    Boot(String),
    /// `reset`, or the end of the script without booting.
    Reset,
}

/// The stored environment, as the script's device keeps it.
pub trait Store {
    /// Every stored variable.
    fn load(&self) -> Result<Vec<(String, String)>, String>;
    /// Sets (`Some`) or removes (`None`) variables in one write.
    fn save(&self, changes: &[(String, Option<String>)]) -> Result<(), String>;
}

/// Runs `script` once, from power-on (or reset) to a boot or the next reset. `defaults` is
/// U-Boot's built-in environment; with `env_in_ram` the stored environment is loaded at start
/// (CONFIG_ENV_IS_IN_MMC and friends, for `saveenv`), without it only `fatload` + `env import`
/// reach it.
pub fn run(
    script: &str,
    store: &dyn Store,
    defaults: &[(&str, &str)],
    env_in_ram: bool,
) -> Result<Outcome, String> {
    let program = parse(&tokenize(script)?)?;
    let mut machine = Machine {
        vars: defaults
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        stored: BTreeMap::new(),
        memory: BTreeMap::new(),
        store,
        steps: 0,
    };
    if env_in_ram {
        machine.stored = store.load()?.into_iter().collect();
        machine.vars.extend(machine.stored.clone());
    }
    match machine.list(&program) {
        Ok(_) => Ok(Outcome::Reset),
        Err(Stop::Boot(slot)) => Ok(Outcome::Boot(slot)),
        Err(Stop::Reset) => Ok(Outcome::Reset),
        Err(Stop::Error(e)) => Err(e),
    }
}

// --- tokens and syntax ----------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Var(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Word {
    parts: Vec<(Part, bool)>, // (part, quoted)
}

impl Word {
    fn literal(&self) -> Option<String> {
        let mut text = String::new();
        for (part, quoted) in &self.parts {
            match (part, quoted) {
                (Part::Text(t), false) => text.push_str(t),
                _ => return None,
            }
        }
        Some(text)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(Word),
    Separator, // `;` or a newline
    And,
    Or,
}

fn tokenize(script: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = script.chars().peekable();
    let mut word: Option<Word> = None;
    let finish = |word: &mut Option<Word>, tokens: &mut Vec<Token>| {
        if let Some(w) = word.take() {
            tokens.push(Token::Word(w));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '#' if word.is_none() => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '\n' | ';' => {
                finish(&mut word, &mut tokens);
                tokens.push(Token::Separator);
            }
            ' ' | '\t' | '\r' => finish(&mut word, &mut tokens),
            '&' | '|' => {
                if chars.next() != Some(c) {
                    return Err(format!("a single `{c}` is not supported"));
                }
                finish(&mut word, &mut tokens);
                tokens.push(if c == '&' { Token::And } else { Token::Or });
            }
            '\'' => return Err("single quotes are not supported".into()),
            '"' => {
                let w = word.get_or_insert(Word { parts: Vec::new() });
                // An empty "" still makes a word.
                w.parts.push((Part::Text(String::new()), true));
                loop {
                    match chars.next() {
                        None => return Err("an unterminated \" quote".into()),
                        Some('"') => break,
                        Some('$') => w.parts.push((Part::Var(variable(&mut chars)?), true)),
                        Some('\\') => {
                            let escaped = chars.next().ok_or("a \\ at the end")?;
                            w.parts.push((Part::Text(escaped.to_string()), true));
                        }
                        Some(other) => w.parts.push((Part::Text(other.to_string()), true)),
                    }
                }
            }
            '$' => {
                let name = variable(&mut chars)?;
                word.get_or_insert(Word { parts: Vec::new() })
                    .parts
                    .push((Part::Var(name), false));
            }
            other => word
                .get_or_insert(Word { parts: Vec::new() })
                .parts
                .push((Part::Text(other.to_string()), false)),
        }
    }
    finish(&mut word, &mut tokens);
    Ok(tokens)
}

fn variable(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<String, String> {
    if chars.next() != Some('{') {
        return Err("only ${name} variables are supported".into());
    }
    let mut name = String::new();
    loop {
        match chars.next() {
            Some('}') => return Ok(name),
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => name.push(c),
            other => return Err(format!("a bad variable name near {other:?}")),
        }
    }
}

#[derive(Debug)]
enum Node {
    Command(Vec<Word>),
    AndOr(Box<Node>, bool, Box<Node>), // true: &&
    If(Vec<(Vec<Node>, Vec<Node>)>, Vec<Node>),
    For(String, Vec<Word>, Vec<Node>),
}

struct Parser<'t> {
    tokens: &'t [Token],
    at: usize,
}

fn parse(tokens: &[Token]) -> Result<Vec<Node>, String> {
    let mut parser = Parser { tokens, at: 0 };
    let list = parser.list(&[])?;
    match parser.tokens.get(parser.at) {
        None => Ok(list),
        Some(token) => Err(format!("unexpected {token:?}")),
    }
}

impl Parser<'_> {
    fn keyword(&self) -> Option<String> {
        match self.tokens.get(self.at) {
            Some(Token::Word(w)) => w.literal(),
            _ => None,
        }
    }

    fn expect(&mut self, keyword: &str) -> Result<(), String> {
        if self.keyword().as_deref() == Some(keyword) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!(
                "expected `{keyword}`, found {:?}",
                self.tokens.get(self.at)
            ))
        }
    }

    fn skip_separators(&mut self) {
        while self.tokens.get(self.at) == Some(&Token::Separator) {
            self.at += 1;
        }
    }

    /// Statements until one of `ends` (a keyword at a statement's start) or the end.
    fn list(&mut self, ends: &[&str]) -> Result<Vec<Node>, String> {
        let mut nodes = Vec::new();
        loop {
            self.skip_separators();
            match self.keyword() {
                _ if self.at >= self.tokens.len() => return Ok(nodes),
                Some(k) if ends.contains(&k.as_str()) => return Ok(nodes),
                _ => nodes.push(self.and_or()?),
            }
        }
    }

    fn and_or(&mut self) -> Result<Node, String> {
        let mut node = self.statement()?;
        while let Some(op @ (Token::And | Token::Or)) = self.tokens.get(self.at) {
            let and = *op == Token::And;
            self.at += 1;
            self.skip_separators();
            node = Node::AndOr(Box::new(node), and, Box::new(self.statement()?));
        }
        Ok(node)
    }

    fn statement(&mut self) -> Result<Node, String> {
        match self.keyword().as_deref() {
            Some("if") => {
                self.at += 1;
                let mut branches = Vec::new();
                let mut otherwise = Vec::new();
                loop {
                    let condition = self.list(&["then"])?;
                    self.expect("then")?;
                    let body = self.list(&["elif", "else", "fi"])?;
                    branches.push((condition, body));
                    match self.keyword().as_deref() {
                        Some("elif") => self.at += 1,
                        Some("else") => {
                            self.at += 1;
                            otherwise = self.list(&["fi"])?;
                            self.expect("fi")?;
                            break;
                        }
                        _ => {
                            self.expect("fi")?;
                            break;
                        }
                    }
                }
                Ok(Node::If(branches, otherwise))
            }
            Some("for") => {
                self.at += 1;
                let name = self.keyword().ok_or("a `for` without a name")?;
                self.at += 1;
                self.expect("in")?;
                let mut words = Vec::new();
                while let Some(Token::Word(w)) = self.tokens.get(self.at) {
                    words.push(w.clone());
                    self.at += 1;
                }
                self.skip_separators();
                self.expect("do")?;
                let body = self.list(&["done"])?;
                self.expect("done")?;
                Ok(Node::For(name, words, body))
            }
            Some(k @ ("then" | "elif" | "else" | "fi" | "do" | "done" | "in")) => {
                Err(format!("unexpected `{k}`"))
            }
            _ => {
                let mut words = Vec::new();
                while let Some(Token::Word(w)) = self.tokens.get(self.at) {
                    words.push(w.clone());
                    self.at += 1;
                }
                if words.is_empty() {
                    return Err(format!(
                        "expected a command, found {:?}",
                        self.tokens.get(self.at)
                    ));
                }
                Ok(Node::Command(words))
            }
        }
    }
}

// --- running it -----------------------------------------------------------------------------

enum Stop {
    Boot(String),
    Reset,
    Error(String),
}

impl From<String> for Stop {
    fn from(e: String) -> Stop {
        Stop::Error(e)
    }
}

/// Enough for both scripts many times over; a loop beyond it is a bug in a script.
const MAX_STEPS: usize = 5_000_000;

/// What `env export -c` puts in memory: an environment, for `fatwrite` to store.
#[derive(Clone)]
struct Blob(Vec<(String, String)>);

struct Machine<'s> {
    vars: BTreeMap<String, String>,
    /// What the stored environment held when it was loaded (`saveenv` writes the difference).
    stored: BTreeMap<String, String>,
    memory: BTreeMap<String, Blob>,
    store: &'s dyn Store,
    steps: usize,
}

impl Machine<'_> {
    fn list(&mut self, nodes: &[Node]) -> Result<bool, Stop> {
        let mut status = true;
        for node in nodes {
            status = self.node(node)?;
        }
        Ok(status)
    }

    fn node(&mut self, node: &Node) -> Result<bool, Stop> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(Stop::Error(format!("more than {MAX_STEPS} steps")));
        }
        match node {
            Node::Command(words) => {
                let mut args = Vec::new();
                for word in words {
                    args.extend(self.expand(word, false));
                }
                self.command(&args)
            }
            Node::AndOr(left, and, right) => {
                let first = self.node(left)?;
                if first == *and {
                    self.node(right)
                } else {
                    Ok(first)
                }
            }
            Node::If(branches, otherwise) => {
                for (condition, body) in branches {
                    if self.list(condition)? {
                        return self.list(body);
                    }
                }
                self.list(otherwise)
            }
            Node::For(name, words, body) => {
                let mut items = Vec::new();
                for word in words {
                    items.extend(self.expand(word, true));
                }
                let mut status = true;
                for item in items {
                    self.vars.insert(name.clone(), item);
                    status = self.list(body)?;
                }
                Ok(status)
            }
        }
    }

    /// A word's fields: unquoted variables split on blanks (and, in a `for` list, quoted ones).
    fn expand(&self, word: &Word, split_all: bool) -> Vec<String> {
        let mut fields: Vec<String> = Vec::new();
        let mut current: Option<String> = None;
        for (part, quoted) in &word.parts {
            match part {
                Part::Text(t) => current.get_or_insert_with(String::new).push_str(t),
                Part::Var(name) => {
                    let value = self.vars.get(name).cloned().unwrap_or_default();
                    if *quoted && !split_all {
                        current.get_or_insert_with(String::new).push_str(&value);
                        continue;
                    }
                    let mut pieces = value.split([' ', '\t']).peekable();
                    let starts_blank = value.starts_with([' ', '\t']);
                    if starts_blank {
                        fields.extend(current.take());
                    }
                    while let Some(piece) = pieces.next() {
                        if !piece.is_empty() {
                            current.get_or_insert_with(String::new).push_str(piece);
                        }
                        if pieces.peek().is_some() {
                            fields.extend(current.take());
                        }
                    }
                }
            }
        }
        fields.extend(current);
        if split_all {
            fields.retain(|f| !f.is_empty());
        }
        fields
    }

    fn command(&mut self, args: &[String]) -> Result<bool, Stop> {
        let Some(name) = args.first() else {
            return Ok(true);
        };
        let rest: Vec<&str> = args[1..].iter().map(String::as_str).collect();
        match (name.as_str(), rest.as_slice()) {
            ("setenv", [var]) => {
                self.vars.remove(*var);
                Ok(true)
            }
            ("setenv", [var, value @ ..]) => {
                self.vars.insert((*var).to_owned(), value.join(" "));
                Ok(true)
            }
            ("test", expr) => test(expr).map_err(Stop::Error),
            ("echo", _) => Ok(true),
            ("setexpr", [var, a, op, b]) => {
                let (a, b) = (strtoul(a, 16), strtoul(b, 16));
                let result = match *op {
                    "+" => a.wrapping_add(b),
                    "-" => a.wrapping_sub(b),
                    other => return Err(Stop::Error(format!("setexpr {other} is not modelled"))),
                };
                self.vars.insert((*var).to_owned(), format!("{result:x}"));
                Ok(true)
            }
            ("saveenv", []) => {
                let mut changes = Vec::new();
                for (name, value) in &self.vars {
                    if self.stored.get(name) != Some(value) {
                        changes.push((name.clone(), Some(value.clone())));
                    }
                }
                for name in self.stored.keys() {
                    if !self.vars.contains_key(name) {
                        changes.push((name.clone(), None));
                    }
                }
                self.store.save(&changes)?;
                self.stored = self.vars.clone();
                Ok(true)
            }
            ("reset", []) => Err(Stop::Reset),
            ("fatload", [_dev, _part, addr, file]) if file.ends_with(".env") => {
                // An environment the tools cannot read (a bad CRC) loads as bytes that
                // `env import -c` then refuses.
                match self.store.load() {
                    Ok(vars) => self.memory.insert((*addr).to_owned(), Blob(vars)),
                    Err(_) => self.memory.remove(*addr),
                };
                self.vars.insert("filesize".into(), "40000".into());
                Ok(true)
            }
            ("load" | "ext4load" | "fatload", [_dev, _part, _addr, _file]) => Ok(true),
            ("env", ["import", "-c", addr, _size, names @ ..]) => {
                let Some(Blob(blob)) = self.memory.get(*addr).cloned() else {
                    return Ok(false); // no environment at that address: a bad CRC
                };
                let wanted = |n: &str| names.is_empty() || names.contains(&n);
                for (name, value) in blob.iter().filter(|(n, _)| wanted(n)) {
                    self.vars.insert(name.clone(), value.clone());
                }
                // Named variables the file does not hold are removed, as U-Boot does.
                for name in names {
                    if !blob.iter().any(|(n, _)| n == name) {
                        self.vars.remove(*name);
                    }
                }
                Ok(true)
            }
            ("env", ["export", "-c", "-s", _size, addr, names @ ..]) => {
                let blob = self
                    .vars
                    .iter()
                    .filter(|(n, _)| names.is_empty() || names.contains(&n.as_str()))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect();
                self.memory.insert((*addr).to_owned(), Blob(blob));
                Ok(true)
            }
            ("fatwrite", [_dev, _part, addr, file, _size]) if file.ends_with(".env") => {
                let Some(Blob(blob)) = self.memory.get(*addr).cloned() else {
                    return Err(Stop::Error(format!(
                        "fatwrite of {addr}, which holds no environment"
                    )));
                };
                // The file is the blob: every stored variable not in it is gone.
                let mut changes: Vec<(String, Option<String>)> = blob
                    .iter()
                    .map(|(n, v)| (n.clone(), Some(v.clone())))
                    .collect();
                for (name, _) in self.store.load()? {
                    if !blob.iter().any(|(n, _)| *n == name) {
                        changes.push((name, None));
                    }
                }
                self.store.save(&changes)?;
                Ok(true)
            }
            ("booti" | "bootz" | "bootm" | "zboot", _) => {
                let bootargs = self.vars.get("bootargs").cloned().unwrap_or_default();
                let slot = bootargs
                    .split_whitespace()
                    .find_map(|a| a.strip_prefix("rauc.slot="))
                    .ok_or_else(|| format!("{name} with no rauc.slot= in bootargs {bootargs:?}"))?;
                Err(Stop::Boot(slot.to_owned()))
            }
            _ => Err(Stop::Error(format!(
                "the simulator does not model `{}`",
                args.join(" ")
            ))),
        }
    }
}

/// `test`'s expressions that the scripts use.
fn test(expr: &[&str]) -> Result<bool, String> {
    Ok(match expr {
        ["-n", s] => !s.is_empty(),
        ["-z", s] => s.is_empty(),
        ["-n"] => false,
        ["-z"] => true,
        [a, "=", b] => a == b,
        [a, "!=", b] => a != b,
        [a, op @ ("-gt" | "-lt" | "-eq" | "-ne"), b] => {
            let (a, b) = (strtol(a), strtol(b));
            match *op {
                "-gt" => a > b,
                "-lt" => a < b,
                "-eq" => a == b,
                _ => a != b,
            }
        }
        other => return Err(format!("test {} is not modelled", other.join(" "))),
    })
}

/// `simple_strtol(s, NULL, 0)`: a `0x` prefix means hex, else decimal (a leading 0 octal does
/// not occur in the scripts' numbers); digits up to the first other character.
fn strtol(s: &str) -> i64 {
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let value = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => digits(hex, 16),
        None => digits(s, 10),
    } as i64;
    if negative { -value } else { value }
}

/// `simple_strtoul(s, NULL, radix)`: a hex number may start with `0x`.
fn strtoul(s: &str, radix: u32) -> u64 {
    let s = if radix == 16 {
        s.strip_prefix("0x").unwrap_or(s)
    } else {
        s
    };
    digits(s, radix)
}

/// Leading digits of `radix`; none is 0.
fn digits(s: &str, radix: u32) -> u64 {
    s.chars()
        .map_while(|c| c.to_digit(radix))
        .fold(0u64, |n, d| {
            n.wrapping_mul(u64::from(radix)).wrapping_add(u64::from(d))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Ram(RefCell<BTreeMap<String, String>>);

    impl Store for Ram {
        fn load(&self) -> Result<Vec<(String, String)>, String> {
            Ok(self.0.borrow().clone().into_iter().collect())
        }
        fn save(&self, changes: &[(String, Option<String>)]) -> Result<(), String> {
            let mut vars = self.0.borrow_mut();
            for (name, value) in changes {
                match value {
                    Some(v) => vars.insert(name.clone(), v.clone()),
                    None => vars.remove(name),
                };
            }
            Ok(())
        }
    }

    fn ram(vars: &[(&str, &str)]) -> Ram {
        Ram(RefCell::new(
            vars.iter()
                .map(|(n, v)| ((*n).into(), (*v).into()))
                .collect(),
        ))
    }

    #[test]
    fn hush_basics_quoting_splitting_and_control_flow() {
        let store = ram(&[("LIST", "a  b c")]);
        let script = r#"
            # a comment; with a separator in it
            setenv n 0
            for w in "${LIST}"; do setenv last ${w}; setenv seen "${seen}${w}"; done
            test "${seen}" = "abc" && setenv ok1 yes
            test -z "${unset}" || setenv bad yes
            if test "${last}" = "x"; then setenv bad yes; elif test 0x${n} -lt 1; then setenv ok2 yes; else setenv bad yes; fi
            setexpr n ${n} + f
            setenv bootargs "root=x rauc.slot=${n}"
            saveenv
            zboot
        "#;
        assert_eq!(
            run(script, &store, &[], true).unwrap(),
            Outcome::Boot("f".into())
        );
        let vars = store.0.borrow();
        assert_eq!(vars.get("ok1").map(String::as_str), Some("yes"));
        assert_eq!(vars.get("ok2").map(String::as_str), Some("yes"));
        assert_eq!(vars.get("bad"), None);
        assert_eq!(vars.get("seen").map(String::as_str), Some("abc"));
    }

    #[test]
    fn unknown_commands_and_syntax_are_errors_not_skipped() {
        let store = ram(&[]);
        for script in [
            "frobnicate",
            "if true; then",
            "echo 'single'",
            "setenv $x y",
            "a & b",
        ] {
            assert!(run(script, &store, &[], true).is_err(), "{script}");
        }
    }

    #[test]
    fn fat_environment_round_trip_keeps_only_the_named_variables() {
        let store = ram(&[("A", "1"), ("B", "2"), ("bootcmd", "evil")]);
        let script = "fatload virtio 0:1 ${loadaddr} uboot.env
            env import -c ${loadaddr} 0x40000 A C
            setenv A 5
            env export -c -s 0x40000 ${loadaddr} A C
            fatwrite virtio 0:1 ${loadaddr} uboot.env 0x40000
            test -z \"${bootcmd}\" && test -z \"${B}\" && reset";
        assert_eq!(
            run(script, &store, &[("loadaddr", "0x2000000")], false).unwrap(),
            Outcome::Reset
        );
        let vars: Vec<_> = store.0.borrow().clone().into_iter().collect();
        assert_eq!(vars, [("A".to_owned(), "5".to_owned())]);
    }

    #[test]
    fn numbers_as_u_boot_reads_them() {
        assert_eq!(strtol("0x1f"), 31);
        assert_eq!(strtol("12abc"), 12);
        assert_eq!(strtol("0x0x3"), 0);
        assert_eq!(strtol(""), 0);
        assert_eq!(strtoul("a", 16), 10);
    }
}
