//! A replica's connections to the database: an r2d2 pool of clients, each with the batch
//! statement prepared once (planning it for every batch cost more than running it).

use postgres::types::Type;
use postgres::{Client, Config, NoTls, Statement};

use super::BATCH;

/// One pooled connection.
pub(super) struct Conn {
    pub client: Client,
    /// [`BATCH`], prepared.
    pub batch: Statement,
}

/// Opens connections for the pool.
pub(super) struct Manager {
    pub config: Config,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = postgres::Error;

    /// A connection whose commits do not wait for the disk: a batch is acknowledged only after
    /// [`super::flush`], which waits for every commit before it at once (group commit, as the
    /// file ledger's). What must be durable by itself (`DONE`) says so in its transaction.
    fn connect(&self) -> Result<Conn, postgres::Error> {
        let mut client = self.config.connect(NoTls)?;
        client.batch_execute("SET synchronous_commit = off")?;
        let types = [
            Type::INT4,
            Type::INT8,
            Type::INT8,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
            Type::TEXT_ARRAY,
        ];
        let batch = client.prepare_typed(BATCH, &[&types[..], &[Type::INT2_ARRAY, Type::INT8]].concat())?;
        Ok(Conn { client, batch })
    }

    fn is_valid(&self, conn: &mut Conn) -> Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.client.is_closed()
    }
}
