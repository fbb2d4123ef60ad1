//! A batch's rows, which the session encoded as `bets.csv` rows, as the arrays the batch
//! statement takes.

use crate::ledger::Rows;

/// A batch's rows as one array per column, for the batch statement.
pub(super) struct Columns {
    pub first_names: Vec<String>,
    pub last_names: Vec<String>,
    pub documents: Vec<String>,
    pub birthdates: Vec<String>,
    pub numbers: Vec<i16>,
}

impl Columns {
    /// Reads back the `bets.csv` rows the session encoded (valid bets, so this fails only on
    /// a bug).
    pub(super) fn of(rows: &Rows) -> Result<Columns, String> {
        let n = rows.len();
        let mut columns = Columns {
            first_names: Vec::with_capacity(n),
            last_names: Vec::with_capacity(n),
            documents: Vec::with_capacity(n),
            birthdates: Vec::with_capacity(n),
            numbers: Vec::with_capacity(n),
        };
        let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(rows.bytes.as_slice());
        for record in reader.records() {
            let record = record.map_err(|e| format!("a stored row does not read back: {e}"))?;
            let [_, first, last, document, birthdate, number] = [0, 1, 2, 3, 4, 5].map(|i| record.get(i));
            let number = number.and_then(|n| n.parse().ok());
            let (Some(first), Some(last), Some(document), Some(birthdate), Some(number)) =
                (first, last, document, birthdate, number)
            else {
                return Err(format!("a stored row does not read back: {record:?}"));
            };
            columns.first_names.push(first.to_owned());
            columns.last_names.push(last.to_owned());
            columns.documents.push(document.to_owned());
            columns.birthdates.push(birthdate.to_owned());
            columns.numbers.push(number);
        }
        Ok(columns)
    }
}
