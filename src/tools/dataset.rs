//! Synthetic agency files, for a round without the course's data: Argentine names with
//! accents, 8-digit documents, birthdates 1940–2006, numbers 0–9999 with some winners.
//! The same seed always writes the same files.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
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
pub(crate) fn agency_file(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("agency-{id}.csv"))
}

/// Agency `id`'s rows of a data set, made as they are read: the bytes `agency-{id}.csv`
/// holds, without the file (`lottery-round` gives each agency its rows this way).
pub(crate) struct Rows {
    rng: Rng,
    left: u64,
    writer: RowWriter,
    made: Vec<u8>,
    at: usize,
}

impl Rows {
    /// The `bets` rows of agency `id` in the data set of `seed`.
    pub(crate) fn new(id: u32, bets: u64, seed: u64) -> Rows {
        let rng = Rng(seed ^ u64::from(id).wrapping_mul(0x2545_F491_4F6C_DD1D));
        Rows { rng, left: bets, writer: RowWriter::default(), made: Vec::new(), at: 0 }
    }

    /// Makes up to 1,024 more rows; false when there are none left.
    fn refill(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        for _ in 0..self.left.min(1024) {
            self.writer.push_bet(&bet(&mut self.rng));
        }
        self.left -= self.left.min(1024);
        self.made = self.writer.take();
        self.at = 0;
        true
    }
}

impl Read for Rows {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.made.len() && !self.refill() {
            return Ok(0);
        }
        let n = buf.len().min(self.made.len() - self.at);
        buf[..n].copy_from_slice(&self.made[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The winning bets among agency `id`'s rows (see [`Rows`]).
pub(crate) fn winners(id: u32, bets: u64, seed: u64) -> u64 {
    let mut rng = Rng(seed ^ u64::from(id).wrapping_mul(0x2545_F491_4F6C_DD1D));
    (0..bets).map(|_| u64::from(bet(&mut rng).has_won())).sum()
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
            let mut rows = Rows::new(id, bets, seed);
            while rows.refill() {
                out.write_all(&rows.made)?;
                written.fetch_add(rows.made.iter().filter(|&&b| b == b'\n').count() as u64, Ordering::Relaxed);
            }
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
        // Made in memory: the same bytes, and the winners counted without them.
        let mut made = String::new();
        Rows::new(1, 5_000, 7).read_to_string(&mut made).unwrap();
        assert_eq!(made, text);
        assert_eq!(winners(1, 5_000, 7), bets.iter().filter(|b| b.has_won()).count() as u64);
    }
}
