//! Synthetic agency files, for a round without the course's data: Argentine names with
//! accents, 8-digit documents, birthdates 1940–2006, numbers 0–9999 with some winners.
//! The same seed always writes the same files.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::wire::bet::{Bet, RowWriter, WINNING_NUMBER};

const FIRST: &[&str] = &[
    "Santiago",
    "Mateo",
    "Tiago Nicolás",
    "Agustín",
    "Joaquín",
    "Benjamín",
    "Martín",
    "Lautaro",
    "Tomás",
    "Facundo",
    "Valentina",
    "Sofía",
    "Martina",
    "Lucía",
    "Catalina",
    "Emilia",
    "Julieta",
    "Camila",
    "Ramón",
    "María José",
    "Agustina",
    "Florencia",
    "Inés",
    "Noelia",
    "Germán",
    "Iñaki",
    "Ezequiel",
    "Maximiliano",
    "Belén",
    "Zoë",
];

const LAST: &[&str] = &[
    "González",
    "Rodríguez",
    "Gómez",
    "Fernández",
    "López",
    "Díaz",
    "Martínez",
    "Pérez",
    "García",
    "Sánchez",
    "Romero",
    "Sosa",
    "Álvarez",
    "Torres",
    "Ruiz",
    "Ramírez",
    "Flores",
    "Benítez",
    "Acosta",
    "Medina",
    "Herrera",
    "Suárez",
    "Aguirre",
    "Giménez",
    "Gutiérrez",
    "Peña",
    "Muñoz",
    "Rivera",
    "Zambrano",
    "Lorca",
];

/// One winning bet in this many, on top of the ones chance gives (one in 10,000).
const WIN_EVERY: u64 = 2_500;

/// A small deterministic generator (SplitMix64): enough for test data, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The next synthetic bet from `rng`.
fn bet(rng: &mut Rng) -> Bet {
    let number = if rng.below(WIN_EVERY) == 0 { WINNING_NUMBER } else { rng.below(10_000) as u16 };
    Bet {
        first_name: rng.pick(FIRST).to_owned(),
        last_name: rng.pick(LAST).to_owned(),
        document: (10_000_000 + rng.below(40_000_000)).to_string(),
        birthdate: format!("{}-{:02}-{:02}", 1940 + rng.below(67), 1 + rng.below(12), 1 + rng.below(28)),
        number,
    }
}

/// The path of agency `id`'s file in `dir`.
pub fn agency_file(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("agency-{id}.csv"))
}

/// Writes `agency-1.csv` … `agency-{agencies}.csv` into `dir` (created if needed), with
/// `bets` bets each, and returns their paths.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn generate(dir: &Path, agencies: u32, bets: u64, seed: u64) -> io::Result<Vec<PathBuf>> {
    generate_counted(dir, agencies, bets, seed, &AtomicU64::new(0))
}

/// [`generate`], adding to `written` the bets written so far, for a progress display.
///
/// # Errors
/// As [`generate`].
pub fn generate_counted(
    dir: &Path,
    agencies: u32,
    bets: u64,
    seed: u64,
    written: &AtomicU64,
) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    (1..=agencies)
        .map(|id| {
            let path = agency_file(dir, id);
            let mut out = BufWriter::with_capacity(1 << 20, File::create(&path)?);
            let mut rng = Rng(seed ^ u64::from(id).wrapping_mul(0x2545_F491_4F6C_DD1D));
            let mut rows = RowWriter::default();
            for i in 0..bets {
                rows.push_bet(&bet(&mut rng));
                if i % 1024 == 1023 {
                    out.write_all(&rows.take())?;
                    written.fetch_add(1024, Ordering::Relaxed);
                }
            }
            out.write_all(&rows.take())?;
            written.fetch_add(bets % 1024, Ordering::Relaxed);
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::bet::RowParser;

    #[test]
    fn generates_valid_deterministic_files() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        generate(a.path(), 2, 5_000, 7).unwrap();
        generate(b.path(), 2, 5_000, 7).unwrap();
        let text = fs::read_to_string(agency_file(a.path(), 1)).unwrap();
        assert_eq!(text, fs::read_to_string(agency_file(b.path(), 1)).unwrap());
        let mut parser = RowParser::default();
        let today = crate::wire::bet::today();
        let bets: Vec<Bet> = text.lines().map(|l| parser.bet(l.as_bytes(), today).unwrap()).collect();
        assert_eq!(bets.len(), 5_000);
        assert!(bets.iter().any(Bet::has_won));
        assert!(bets.iter().any(|b| !b.first_name.is_ascii()));
    }
}
