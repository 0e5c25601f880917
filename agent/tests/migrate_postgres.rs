//! The migration engine against a real PostgreSQL server (started by the
//! test harness; a test that cannot start one fails).

mod migrate_common;

use cutover_agent::migrate::{self, DbUrl, Direction, Outcome, Quiet};
use migrate_common::postgres as cutover_tests_postgres;
use migrate_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_up_down_up_with_status() {
    up_down_up(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_failure_halfway_rolls_back_by_downs() {
    failure_halfway_rolls_back_by_downs(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_failed_check_rolls_back() {
    failed_check_rolls_back(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_missing_down_restores_backup() {
    missing_down_restores_backup(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_failing_down_restores_backup() {
    failing_down_restores_backup(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_drift_is_refused() {
    drift_is_refused(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_plan_changes_nothing() {
    plan_changes_nothing(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_standalone_restore() {
    standalone_restore(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_no_transaction_failure_restores_backup() {
    no_transaction_failure_restores_backup(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_failed_down_run_reapplies_ups() {
    failed_down_run_reapplies_ups(&Backend::postgres()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_runs_do_not_interleave() {
    concurrent_runs_do_not_interleave(&Backend::postgres()).await;
}

/// A restore removes everything the failed run created, whatever it is (a
/// schema, a type, a function, a sequence), and brings back what it
/// dropped; the `public` schema keeps its owner, comment and privileges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restore_is_exact_for_any_object() {
    let b = Backend::postgres();
    let cfg = b.db("exact");
    migrate::up(&cfg, &source(BASE), Some(2), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let Backend::Postgres(pg, _) = &b else { unreachable!() };
    let acl = "SELECT nspowner::regrole::text || ' ' || coalesce(nspacl::text, '') || ' ' || \
               coalesce(obj_description(oid, 'pg_namespace'), '') FROM pg_namespace WHERE nspname = 'public'";
    let public_before = pg.psql("exact", acl).unwrap();
    let src = with(
        &[
            (
                "3_everything.sql",
                "CREATE SCHEMA reporting;\n\
                 CREATE TABLE reporting.daily (day date PRIMARY KEY, n bigint);\n\
                 CREATE TYPE mood AS ENUM ('ok', 'bad');\n\
                 CREATE SEQUENCE counter;\n\
                 CREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql AS $$ SELECT x * 2; $$;\n\
                 CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 10;\n\
                 DROP TABLE orders CASCADE;\n\
                 ALTER TABLE users RENAME TO people;\n",
            ),
            ("4_fail.sql", "SELECT twice('not a number');\n"),
        ],
        2,
    );
    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::RestoredFromBackup, "{r:?}");
    assert_eq!(checksum(&cfg).await, before);
    assert_eq!(pg.psql("exact", acl).unwrap(), public_before);
    assert_eq!(
        pg.psql("exact", "SELECT count(*) FROM pg_namespace WHERE nspname = 'reporting'")
            .unwrap(),
        "0"
    );
    assert_eq!(pg.psql("exact", "SELECT count(*) FROM orders").unwrap(), "2");
}

/// The password never shows: not in the errors of a failed connection, a
/// bad URL or a failed run, not in reports, configs or events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_connection_string_never_leaks() {
    let b = Backend::postgres();
    let secret = b.secret().unwrap().to_owned();
    let cfg = b.db("secrets");
    let url = cfg.url.expose().to_owned();
    assert!(url.contains(&secret));
    let leaks = |what: &str, text: &str| {
        assert!(!text.contains(&secret), "{what} shows the password: {text}");
        assert!(!text.contains(&url), "{what} shows the URL: {text}");
    };
    leaks("config Debug", &format!("{cfg:?}"));
    leaks("url Display", &format!("{}", cfg.url));

    // A failed run's report.
    let events = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let ev = events.clone();
    let obs = move |e: &migrate::RunEvent<'_>| ev.lock().unwrap().push_str(&format!("{e}\n{e:?}\n"));
    let src = with(&[("2_bad.up.sql", "SELECT nope;"), ("2_bad.down.sql", "SELECT 1;")], 1);
    let r = migrate::up(&cfg, &src, None, &[], &obs).await.unwrap();
    assert_eq!(r.outcome, Outcome::RolledBackByDowns, "{r:?}");
    leaks("report Debug", &format!("{r:?}"));
    leaks("report JSON", &serde_json::to_string(&r).unwrap());
    leaks("events", &events.lock().unwrap());
    leaks("status", &format!("{:?}", migrate::status(&cfg, &src).await.unwrap()));
    leaks(
        "plan",
        &format!("{:?}", migrate::plan(&cfg, &src, None, Direction::Up).await.unwrap()),
    );

    // Errors: a database that does not exist, a closed port, a wrong
    // password, an unsupported URL parameter.
    let Backend::Postgres(pg, _) = &b else { unreachable!() };
    let mut attempts = vec![
        url.replace("/secrets", "/no_such_db"),
        url.replace(&format!(":{}/", pg.port()), ":1/"),
        url.replace("/secrets", "/secrets?frobnicate=1"),
    ];
    let wrong = url.replace(&secret, &format!("{secret}Wrong"));
    attempts.push(wrong.clone());
    for u in attempts {
        let mut c = cfg.clone();
        c.url = DbUrl::new(u.clone());
        c.lock_timeout = std::time::Duration::from_secs(2);
        for e in [
            migrate::status(&c, &src).await.unwrap_err(),
            migrate::up(&c, &src, None, &[], &Quiet).await.unwrap_err(),
            migrate::dump_checksum(&c).await.unwrap_err(),
        ] {
            let text = format!("{e} / {e:?}");
            leaks("error", &text);
            assert!(!text.contains(&u), "error shows the URL: {text}");
            assert!(
                !text.contains(&format!("{secret}Wrong")),
                "error shows the password: {text}"
            );
        }
    }
    // pg_dump got the password through the passfile: the server asks for
    // it over TCP, and the dump above (and the run's backup) worked.
    migrate::dump_checksum(&cfg).await.unwrap();
    assert!(r.backup.is_some());

    // The secret is not in the backup directory's file names either.
    for f in std::fs::read_dir(&cfg.backup_dir).unwrap() {
        leaks("backup file name", &f.unwrap().file_name().to_string_lossy());
    }
}

/// A unix-socket URL (host percent-encoded) works for sqlx and for the
/// libpq tools behind backup, restore and checksums alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_unix_socket_url() {
    let b = Backend::postgres();
    let Backend::Postgres(pg, tmp) = &b else { unreachable!() };
    pg.create_database("unixdb").unwrap();
    let host = pg.socket_dir().display().to_string().replace('/', "%2F");
    let url = format!(
        "postgres://{}@{host}:{}/unixdb",
        cutover_tests_postgres::SUPERUSER,
        pg.port()
    );
    let cfg = migrate::DbConfig {
        pg_bin_dir: Some(pg.bin_dir().to_owned()),
        ..migrate::DbConfig::new(
            "unixdb",
            migrate::Driver::Postgres,
            DbUrl::new(url),
            tmp.path().join("b"),
        )
    };
    migrate::up(&cfg, &source(BASE), Some(1), &[], &Quiet).await.unwrap();
    let before = checksum(&cfg).await;
    let src = with(
        &[
            ("2_x.sql", "CREATE TABLE x (y INTEGER);"),
            ("3_bad.sql", "SELECT nope;"),
        ],
        1,
    );
    let r = migrate::up(&cfg, &src, None, &[], &Quiet).await.unwrap();
    assert_eq!(r.outcome, Outcome::RestoredFromBackup, "{r:?}");
    assert_eq!(checksum(&cfg).await, before);
}
