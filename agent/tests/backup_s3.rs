//! Backups to S3, the agent's pipeline (issue: backups to S3): a real
//! PostgreSQL and a real S3-protocol server (moto) on loopback, both
//! started here.
//!
//! - Round trip: backup, validate, restore into a scratch database; the
//!   scratch database's content checksum equals the source's.
//! - A corrupted, truncated or wrongly keyed object is named as such and
//!   never restored (no scratch database is left behind).
//! - A dump that fails mid-stream leaves no object and no unfinished
//!   multipart upload.

use cutover_devkit::postgres;
#[path = "../../tests/src/s3.rs"]
mod s3;

use cutover_agent::backup::seal::BackupKey;
use cutover_agent::backup::store::ObjectStore;
use cutover_agent::backup::{self, BackupError, BackupRecord};
use cutover_agent::migrate::{DbConfig, DbUrl, Driver, dump_checksum};

struct Fixture {
    pg: postgres::TestPostgres,
    _s3: s3::TestS3,
    db: DbConfig,
    store: ObjectStore,
    keys: Vec<BackupKey>,
    dir: tempfile::TempDir,
}

/// A database with about 13 MB of hard-to-compress rows (so the backup
/// spans several 5 MiB parts), a versioned bucket, and one key.
async fn fixture(name: &str) -> Fixture {
    let pg = postgres::TestPostgres::start().unwrap();
    let url = pg.create_database(name).unwrap();
    pg.psql(
        name,
        "create table orders (id int primary key, item text not null); \
         insert into orders select g, (select string_agg(md5(random()::text || s), '') \
         from generate_series(1, 40 + g % 2) s) from generate_series(1, 10000) g; \
         create table customers (id int primary key, name text); \
         insert into customers values (1, 'ada'), (2, 'grace');",
    )
    .unwrap();
    let s3 = s3::TestS3::start().unwrap();
    s3.create_bucket("backups", true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = BackupKey::generate("k1").unwrap();
    let cfg = s3
        .backup_config("backups", "test/", dir.path(), &key.to_hex(), "testing-secret")
        .unwrap();
    let store = ObjectStore::connect(&cfg).await.unwrap();
    assert!(store.versioning_enabled().await.unwrap());
    let keys = backup::load_keys(&cfg).unwrap();
    let db = DbConfig::new("sample", Driver::Postgres, DbUrl::new(url), dir.path().join("work"));
    Fixture {
        pg,
        _s3: s3,
        db,
        store,
        keys,
        dir,
    }
}

fn scratch_exists(f: &Fixture, name: &str) -> bool {
    f.pg.psql(
        "postgres",
        &format!("select count(*) from pg_database where datname = '{name}'"),
    )
    .unwrap()
        == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_round_trips_through_s3_into_a_scratch_database() {
    let f = fixture("shop").await;
    let record = backup::backup(&f.db, &f.store, &f.keys, "sample/us-east/shop-1.cbk")
        .await
        .unwrap();
    assert_eq!(record.key_id, "k1");
    assert!(record.object.parts >= 2, "expected a multipart upload, got {record:?}");
    assert!(record.object.version_id.is_some(), "{record:?}");
    assert_eq!(record.object.key, "test/sample/us-east/shop-1.cbk");
    assert!(record.dump_bytes > record.object.size, "zstd did nothing: {record:?}");

    let verified = backup::verify(&f.store, &record, &f.keys).await.unwrap();
    assert_eq!(verified.dump_bytes, record.dump_bytes);

    let url = backup::restore_scratch(&f.db, &f.store, &record, &f.keys, "shop_scratch")
        .await
        .unwrap();
    let scratch = DbConfig::new("sample", Driver::Postgres, url, f.dir.path().join("work"));
    assert_eq!(
        dump_checksum(&scratch).await.unwrap(),
        dump_checksum(&f.db).await.unwrap(),
        "the restored database differs from the source"
    );
    backup::drop_scratch(&f.db, "shop_scratch").await.unwrap();
    assert!(!scratch_exists(&f, "shop_scratch"));
}

/// Downloads the object whole (test only: small) to damage it.
async fn object_bytes(f: &Fixture, record: &BackupRecord) -> Vec<u8> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let store = f.store.clone();
    let key = record.object.key.clone();
    let version = record.object.version_id.clone();
    let dl = tokio::spawn(async move { store.download(&key, version.as_deref(), tx).await });
    let mut all = Vec::new();
    while let Some(c) = rx.recv().await {
        all.extend(c);
    }
    dl.await.unwrap().unwrap().expect("read to the end");
    all
}

/// Puts `bytes` as a new version and points the record at it, with the
/// record's size and checksum kept: what a store that damaged the object
/// (or an attacker who replaced it) would serve.
async fn replaced(f: &Fixture, record: &BackupRecord, bytes: Vec<u8>) -> BackupRecord {
    let mut r = record.clone();
    r.object.version_id = f.store.put(&record.object.key, bytes).await.unwrap();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_truncated_or_wrongly_keyed_backups_are_named_and_never_restored() {
    let f = fixture("ledger").await;
    let record = backup::backup(&f.db, &f.store, &f.keys, "sample/us-east/ledger-1.cbk")
        .await
        .unwrap();
    let bytes = object_bytes(&f, &record).await;
    assert_eq!(bytes.len() as u64, record.object.size);

    // One flipped byte in the middle.
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let corrupt = replaced(&f, &record, flipped).await;
    let e = backup::restore_scratch(&f.db, &f.store, &corrupt, &f.keys, "ledger_scratch")
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("corrupt"), "{e}");
    assert!(!scratch_exists(&f, "ledger_scratch"), "a corrupt backup was restored");

    // Cut short.
    let truncated = replaced(&f, &record, bytes[..bytes.len() - 1000].to_vec()).await;
    let e = backup::verify(&f.store, &truncated, &f.keys).await.unwrap_err();
    assert!(matches!(e, BackupError::Truncated { .. }), "{e}");
    // A restore reads it in one pass: pg_restore may have taken most of
    // it, and still nothing is left behind.
    let e = backup::restore_scratch(&f.db, &f.store, &truncated, &f.keys, "ledger_scratch")
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Truncated { .. }), "{e}");
    assert!(!scratch_exists(&f, "ledger_scratch"), "a truncated backup was restored");

    // The damage is also caught by the seal alone: with the checksum
    // recorded for the damaged bytes (a catalog that was altered too), the
    // chunk's authentication still fails.
    let mut flipped = bytes.clone();
    flipped[mid] ^= 0x40;
    let mut forged = replaced(&f, &record, flipped.clone()).await;
    forged.object.sha256 = cutover_shared::release::sha256_hex(&flipped);
    let e = backup::verify(&f.store, &forged, &f.keys).await.unwrap_err();
    assert!(
        matches!(e, BackupError::Corrupt { .. }) && e.to_string().contains("authentication"),
        "{e}"
    );

    // The right id, the wrong key; and a key id this agent lacks.
    let impostor = BackupKey::generate("k1").unwrap();
    let e = backup::restore_scratch(&f.db, &f.store, &record, &[impostor], "ledger_scratch")
        .await
        .unwrap_err();
    assert!(
        matches!(e, BackupError::Key { .. }) && e.to_string().contains("not the key"),
        "{e}"
    );
    let other = BackupKey::generate("k2").unwrap();
    let e = backup::verify(&f.store, &record, &[other]).await.unwrap_err();
    assert!(e.to_string().contains("\"k1\""), "{e}");
    assert!(!scratch_exists(&f, "ledger_scratch"));

    // The original version is untouched and still restores.
    backup::verify(&f.store, &record, &f.keys).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_that_fails_leaves_no_object_and_no_unfinished_upload() {
    let f = fixture("broken").await;
    // A pg_dump that streams 12 MB (two parts are uploaded) and then fails,
    // as a dump does when the server goes away mid-way.
    let bin = f.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let tool = bin.join("pg_dump");
    std::fs::write(
        &tool,
        "#!/bin/sh\nhead -c 12000000 /dev/urandom\necho 'server closed the connection' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut failing = f.db.clone();
    failing.pg_bin_dir = Some(bin);
    let e = backup::backup(&failing, &f.store, &f.keys, "sample/us-east/broken-1.cbk")
        .await
        .unwrap_err();
    assert!(matches!(e, BackupError::Source(_)), "{e}");
    assert!(e.to_string().contains("server closed the connection"), "{e}");
    let msg = e.to_string();
    assert!(!msg.contains(f.pg.password()), "{msg}");
    assert!(
        f.store.incomplete("test/").await.unwrap().is_empty(),
        "an unfinished upload was left"
    );
    let probe = BackupRecord {
        object: backup::store::Uploaded {
            key: "test/sample/us-east/broken-1.cbk".into(),
            version_id: None,
            size: 0,
            sha256: String::new(),
            parts: 0,
        },
        key_id: "k1".into(),
        dump_bytes: 0,
    };
    assert!(
        matches!(
            backup::verify(&f.store, &probe, &f.keys).await,
            Err(BackupError::Store(_))
        ),
        "an object was written"
    );
}
