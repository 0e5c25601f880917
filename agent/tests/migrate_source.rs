//! Migration sources: file naming, validation, sqlx compatibility, and the
//! `[[databases]]` config. No database needed.

use cutover_agent::migrate::{
    DatabaseConfig, DbUrl, Driver, MigrateError, MigrationSource, REDACTED, split_statements,
};
use cutover_shared::release::BundleError;
use sha2::{Digest, Sha384};

fn files(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    list.iter()
        .map(|(n, s)| (n.to_string(), s.as_bytes().to_vec()))
        .collect()
}

fn refused(list: &[(&str, &str)]) -> MigrateError {
    MigrationSource::from_files(files(list)).expect_err("refused")
}

#[test]
fn parses_reversible_and_irreversible_migrations() {
    let s = MigrationSource::from_files(files(&[
        ("1_create_users.up.sql", "CREATE TABLE users (id int);"),
        ("1_create_users.down.sql", "DROP TABLE users;"),
        ("0002_seed.sql", "-- no-transaction\nINSERT INTO users VALUES (1);"),
    ]))
    .unwrap();
    assert_eq!(s.versions().collect::<Vec<_>>(), vec![1, 2]);
    let one = s.get(1).unwrap();
    assert_eq!(one.description, "create users");
    assert!(one.down.is_some());
    assert_eq!(one.down_file.as_deref(), Some("1_create_users.down.sql"));
    assert_eq!(
        one.checksum(),
        Sha384::digest(b"CREATE TABLE users (id int);").as_slice()
    );
    let two = s.get(2).unwrap();
    assert!(two.down.is_none() && two.up.no_tx);
    assert_eq!(s.newest(), Some(2));
    assert_eq!(s.migrator().iter().count(), 3);
    let total = "CREATE TABLE users (id int);DROP TABLE users;-- no-transaction\nINSERT INTO users VALUES (1);".len();
    assert_eq!(s.total_bytes(), total as u64);
}

#[test]
fn refuses_bad_file_names_naming_the_file() {
    for bad in [
        "../1_x.sql",
        "dir/1_x.sql",
        "1_x..up.sql",
        "x_1.sql",
        "1_.sql",
        "1x.sql",
        "-1_neg.sql",
        "0_zero.sql",
        "1_has space.sql",
        "1_notes.txt",
        "1_x.up.SQL",
        "99999999999999999999_big.sql",
    ] {
        let e = refused(&[(bad, "SELECT 1;")]);
        assert!(
            matches!(&e, MigrateError::Bundle(BundleError::BadFile { file, .. }) if file == bad),
            "{bad}: {e:?}"
        );
        assert!(e.to_string().contains(bad), "{e}");
    }
}

#[test]
fn refuses_two_migrations_with_one_version() {
    let e = refused(&[("1_a.up.sql", "SELECT 1;"), ("01_b.up.sql", "SELECT 2;")]);
    let text = e.to_string();
    assert!(
        matches!(
            e,
            MigrateError::Bundle(BundleError::DuplicateVersion { version: 1, .. })
        ),
        "{e:?}"
    );
    assert!(text.contains("1_a.up.sql") && text.contains("01_b.up.sql"), "{text}");
    let e = refused(&[("1_a.sql", "SELECT 1;"), ("1_a.up.sql", "SELECT 1;")]);
    assert!(
        matches!(
            e,
            MigrateError::Bundle(BundleError::DuplicateVersion { version: 1, .. })
        ),
        "{e:?}"
    );
}

#[test]
fn refuses_an_up_without_its_down_when_others_have_downs() {
    let e = refused(&[
        ("1_a.up.sql", "SELECT 1;"),
        ("1_a.down.sql", "SELECT 1;"),
        ("2_b.up.sql", "SELECT 2;"),
    ]);
    assert!(
        matches!(&e, MigrateError::Bundle(BundleError::MissingDown { file, .. }) if file == "2_b.up.sql"),
        "{e:?}"
    );
    assert!(e.to_string().contains("2_b.down.sql"), "{e}");
    // Without any downs, ups are simply irreversible; a plain .sql always is.
    MigrationSource::from_files(files(&[("1_a.up.sql", "SELECT 1;"), ("2_b.up.sql", "SELECT 2;")])).unwrap();
    MigrationSource::from_files(files(&[
        ("1_a.up.sql", "SELECT 1;"),
        ("1_a.down.sql", "SELECT 1;"),
        ("2_b.sql", "SELECT 2;"),
    ]))
    .unwrap();
}

#[test]
fn refuses_orphan_and_mismatched_downs() {
    let e = refused(&[("3_c.down.sql", "SELECT 1;")]);
    assert!(
        matches!(&e, MigrateError::Bundle(BundleError::OrphanDown { file }) if file == "3_c.down.sql"),
        "{e:?}"
    );
    let e = refused(&[("3_c.up.sql", "SELECT 1;"), ("3_d.down.sql", "SELECT 1;")]);
    assert!(
        matches!(&e, MigrateError::Bundle(BundleError::BadFile { file, .. }) if file == "3_d.down.sql"),
        "{e:?}"
    );
    let e = refused(&[("3_c.sql", "SELECT 1;"), ("3_c.down.sql", "SELECT 1;")]);
    assert!(
        matches!(&e, MigrateError::Bundle(BundleError::BadFile { file, .. }) if file == "3_c.sql"),
        "{e:?}"
    );
}

#[test]
fn refuses_sql_that_is_not_utf8() {
    let e = MigrationSource::from_files(vec![("1_a.sql".into(), vec![b'S', 0xff, 0xfe])]).unwrap_err();
    assert!(
        matches!(&e, MigrateError::Bundle(BundleError::BadFile { file, .. }) if file == "1_a.sql"),
        "{e:?}"
    );
    assert!(e.to_string().contains("UTF-8"), "{e}");
}

/// What sqlx's own directory resolver makes of the same files: the same
/// versions, descriptions, kinds and checksums.
#[tokio::test]
async fn matches_sqlx_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let list = [
        ("1_create_users.up.sql", "CREATE TABLE users (id int);\n"),
        ("1_create_users.down.sql", "DROP TABLE users;\n"),
        (
            "20240101120000_add-index.sql",
            "-- no-transaction\nCREATE INDEX CONCURRENTLY i ON users (id);\n",
        ),
    ];
    for (n, s) in list {
        std::fs::write(dir.path().join(n), s).unwrap();
    }
    std::fs::write(dir.path().join("README.md"), "not a migration").unwrap();
    let ours = MigrationSource::from_dir(dir.path()).unwrap().migrator();
    let theirs = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    let key = |m: &sqlx::migrate::Migration| {
        (
            m.version,
            m.description.to_string(),
            m.migration_type,
            m.checksum.to_vec(),
            m.no_tx,
        )
    };
    assert_eq!(
        ours.iter().map(key).collect::<Vec<_>>(),
        theirs.iter().map(key).collect::<Vec<_>>()
    );

    // A .sql file with a bad name in a directory is refused, not skipped.
    std::fs::write(dir.path().join("2-oops.sql"), "SELECT 1;").unwrap();
    let e = MigrationSource::from_dir(dir.path()).unwrap_err();
    assert!(e.to_string().contains("2-oops.sql"), "{e}");
}

#[test]
fn splits_statements_for_plans() {
    let s = split_statements("CREATE TABLE a (x text DEFAULT ';');\n-- c;\nINSERT INTO a VALUES ($$;$$);");
    assert_eq!(s.len(), 2, "{s:?}");
}

#[test]
fn database_config_from_toml() {
    #[derive(serde::Deserialize)]
    struct AgentPart {
        databases: Vec<DatabaseConfig>,
    }
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("url");
    std::fs::write(&url_file, "postgres://app:Hunter2Secret@127.0.0.1:5432/app\n").unwrap();
    let text = format!(
        r#"
[[databases]]
app = "sample"
driver = "postgres"
url_file = "{}"
primary = true

[[databases]]
app = "other"
driver = "sqlite"
url_env = "CUTOVER_TEST_SQLITE_URL"
primary = false
lock_timeout_ms = 1000
backup_dir = "/var/backups/other"
"#,
        url_file.display()
    );
    let cfg: AgentPart = toml::from_str(&text).unwrap();
    let pg = &cfg.databases[0];
    assert_eq!(pg.driver, Driver::Postgres);
    assert_eq!(pg.lock_timeout_ms, 5000);
    assert_eq!(pg.statement_timeout_ms, 900_000);
    let resolved = cutover_agent::migrate::resolve(pg, std::path::Path::new("/data")).unwrap();
    assert_eq!(resolved.url.expose(), "postgres://app:Hunter2Secret@127.0.0.1:5432/app");
    assert_eq!(resolved.backup_dir, std::path::Path::new("/data/db-backups/sample"));
    assert!(resolved.primary);
    let debug = format!("{resolved:?}");
    assert!(!debug.contains("Hunter2Secret") && debug.contains(REDACTED), "{debug}");

    let other = &cfg.databases[1];
    // `primary = false`, the older spelling, is a standby.
    assert!(!other.is_primary());
    assert_eq!(other.role(), cutover_shared::dr::DbRole::Standby);
    // The variable is not set: refused, naming it.
    let e = cutover_agent::migrate::resolve(other, std::path::Path::new("/data")).unwrap_err();
    assert!(e.to_string().contains("CUTOVER_TEST_SQLITE_URL"), "{e}");

    let both = format!("{}url_env = \"X\"\n", &text[..text.find("primary = true").unwrap()]);
    let cfg: AgentPart = toml::from_str(&both).unwrap();
    assert!(
        cfg.databases[0]
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not both")
    );
    let typo = "[[databases]]\napp = \"a\"\ndriver = \"sqlite\"\nurl_env = \"X\"\nprimry = true\n";
    assert!(toml::from_str::<AgentPart>(typo).is_err());

    assert_eq!(format!("{:?}", DbUrl::new("postgres://u:p@h/d")), REDACTED);
    let e = DbUrl::from_file(&dir.path().join("missing")).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

/// A release bundle (parsed by `cutover-shared`, as the coordinator does)
/// gives the same migrations as the files it came from.
#[test]
fn from_bundle_matches_from_files() {
    let list = [
        ("1_a.up.sql", "CREATE TABLE a (x int);"),
        ("1_a.down.sql", "DROP TABLE a;"),
        ("2_b.sql", "INSERT INTO a VALUES (1);"),
    ];
    let bundle = cutover_shared::release::Bundle::parse(files(&list)).unwrap();
    let from_bundle = MigrationSource::from_bundle(&bundle).unwrap();
    let direct = MigrationSource::from_files(files(&list)).unwrap();
    let key = |s: &MigrationSource| {
        s.migrator()
            .iter()
            .map(|m| {
                (
                    m.version,
                    m.description.to_string(),
                    m.migration_type,
                    m.checksum.to_vec(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(key(&from_bundle), key(&direct));
}
