//! Which automated tests of this repository exercise each TS 103 701 test unit: the table in
//! `docs/conformance-test-map.md`, compiled in, so that the report names the tests beside each
//! unit and the document stays the one place to change. `tests/conformance.rs` fails when a
//! test named there does not exist or a unit is missing.

const MAP: &str = include_str!("../../docs/conformance-test-map.md");

/// The rows of the table: unit id and the tests (`path::function`) named in its last column.
pub fn rows() -> impl Iterator<Item = (&'static str, Vec<&'static str>)> {
    MAP.lines().filter_map(|line| {
        let mut cells = line.strip_prefix('|')?.split('|');
        let unit = cells.next()?.trim();
        if !unit.starts_with("5.3-") {
            return None;
        }
        let tests = cells
            .nth(1)?
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::trim)
            .collect();
        Some((unit, tests))
    })
}

/// The tests that exercise `unit` (none for units only a document review or the laboratory
/// can answer).
pub fn tests_for(unit: &str) -> Vec<&'static str> {
    rows()
        .find(|(id, _)| *id == unit)
        .map(|(_, tests)| tests)
        .unwrap_or_default()
}
