//! What a round must leave in `bets.csv`, and the winners it must name, from the agencies' files.

use std::path::{Path, PathBuf};

/// Reads a CSV file without header into records of strings.
pub fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    reader
        .records()
        .map(|r| r.unwrap_or_else(|e| panic!("{}: {e}", path.display())).iter().map(str::to_owned).collect())
        .collect()
}

pub const WINNING_NUMBER: &str = "7574";

/// The documents of the winning rows of an agency file, in file order.
pub fn winners_of(rows: &[Vec<String>]) -> Vec<String> {
    rows.iter().filter(|r| r[4] == WINNING_NUMBER).map(|r| r[2].clone()).collect()
}

/// What `bets.csv` must hold for these agency files (agency `i + 1` for `files[i]`), sorted.
pub fn expected_store(files: &[PathBuf]) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = files
        .iter()
        .enumerate()
        .flat_map(|(i, path)| {
            read_csv(path).into_iter().map(move |row| {
                let mut stored = vec![(i + 1).to_string()];
                stored.extend(row);
                stored
            })
        })
        .collect();
    rows.sort();
    rows
}

/// Asserts that `bets.csv` holds exactly `expected` (sorted), as a multiset.
pub fn assert_store(bets: &Path, expected: &[Vec<String>]) {
    let mut stored = read_csv(bets);
    stored.sort();
    assert_eq!(stored.len(), expected.len(), "rows in bets.csv");
    if let Some(i) = (0..stored.len()).find(|&i| stored[i] != expected[i]) {
        panic!("bets.csv differs from the input: sorted row {i} is {:?}, expected {:?}", stored[i], expected[i]);
    }
}
