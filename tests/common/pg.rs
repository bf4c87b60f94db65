//! A throwaway PostgreSQL for the tests: one cluster per test process, `initdb` into a
//! temp dir and started on a free port (as the `postgres` system user when the tests run
//! as root, since PostgreSQL refuses to run as root), and one fresh database per test
//! directory. A small watcher process stops the cluster and removes its files when the
//! test process exits, however it exits.
//!
//! The binaries are Debian's `postgresql` package (`/usr/lib/postgresql/<version>/bin`),
//! or wherever `COSMOPOINTS_TEST_PG_BIN` points. `.ci/run` installs the package.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Which backend the integration suites run against: `postgres` when the environment
/// variable `COSMOPOINTS_TEST_BACKEND` says so, else the default (redb).
pub fn enabled() -> bool {
    match std::env::var("COSMOPOINTS_TEST_BACKEND").as_deref() {
        Ok("postgres") => true,
        Ok("redb") | Ok("") | Err(_) => false,
        Ok(other) => panic!("COSMOPOINTS_TEST_BACKEND is {other:?}: use redb or postgres"),
    }
}

/// The running cluster of this test process.
pub struct Cluster {
    pub port: u16,
    bin: PathBuf,
    root: PathBuf,
    as_postgres: bool,
    options: String,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static DATABASES: AtomicU64 = AtomicU64::new(0);

/// The cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(Cluster::start)
}

/// Whether PostgreSQL's binaries are here. When they are not, a test that needs them
/// prints "skipped" and passes, except under CI (`CI` set), where it fails: CI installs
/// them and must run every test.
pub fn available_or_skip(test: &str) -> bool {
    if binaries().is_some() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "{test} needs PostgreSQL under CI: .ci/run installs Debian's postgresql package"
    );
    eprintln!("skipped {test}: PostgreSQL's binaries are not installed");
    false
}

impl Cluster {
    /// A cluster of the caller's own (for a test that stops and starts it).
    pub fn start() -> Cluster {
        let bin = binaries().unwrap_or_else(|| {
            panic!(
                "PostgreSQL's binaries were not found (install Debian's `postgresql` \
                 package, or set COSMOPOINTS_TEST_PG_BIN to the folder holding initdb)"
            )
        });
        let as_postgres = is_root();
        // Under /tmp, not the build tree: the postgres user must reach it.
        let root = std::env::temp_dir().join(format!(
            "cosmopoints-pg-{}-{}",
            std::process::id(),
            random_suffix()
        ));
        std::fs::create_dir_all(&root).expect("cluster dir");
        if as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(&root));
        }
        let data = root.join("data");
        run(command(as_postgres, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]));
        let port = free_port();
        // Durable commits stay on (fsync and synchronous_commit are PostgreSQL's
        // defaults): the tests check acknowledged writes survive a kill.
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400 \
             -c shared_buffers=64MB",
            root.display()
        );
        let cluster = Cluster {
            port,
            bin,
            root,
            as_postgres,
            options,
        };
        cluster.resume();
        watch(as_postgres, &cluster.bin, &cluster.root);
        cluster
    }

    /// Starts the (stopped) cluster again on its port.
    pub fn resume(&self) {
        run(command(self.as_postgres, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-o", &self.options, "-l"])
            .arg(self.root.join("log"))
            .args(["-w", "-t", "60", "start"]));
    }

    /// Stops the cluster at once (`-m immediate`: connections are cut, as in an outage).
    pub fn stop(&self) {
        run(command(self.as_postgres, &self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-m", "immediate", "-w", "stop"]));
    }

    /// A new empty database; its connection URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        self.psql(&format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs one SQL command as the superuser in database `postgres`; its output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// Runs one SQL command as the superuser in database `db`; its output (unaligned,
    /// tuples only).
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db, "-X", "-q", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Whether the cluster runs as the postgres system user, with its socket in this dir.
    pub fn describe(&self) -> String {
        format!(
            "PostgreSQL on 127.0.0.1:{} (files in {}, as {})",
            self.port,
            self.root.display(),
            if self.as_postgres {
                "postgres"
            } else {
                "the current user"
            }
        )
    }
}

/// The database of test directory `dir`: made on first use and named in a file there, so
/// that a server restarted on the same dir finds the same data.
pub fn database_for(dir: &Path) -> String {
    let marker = dir.join("postgres-url");
    if let Ok(url) = std::fs::read_to_string(&marker) {
        return url;
    }
    let url = cluster().create_database();
    std::fs::write(&marker, &url).expect("write the database marker");
    url
}

/// The `[storage]` lines for a Postgres database at `url`.
pub fn storage_section(url: &str) -> String {
    format!("[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\npool_size = 4\n")
}

fn binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("COSMOPOINTS_TEST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    // The newest of Debian's versions.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) {
    let out = command.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts a watcher that stops the cluster (immediately: its data is thrown away) and
/// removes its files once this process is gone.
fn watch(as_postgres: bool, bin: &Path, root: &Path) {
    let pg_ctl = bin.join("pg_ctl");
    let stop = if as_postgres {
        format!(
            "runuser -u postgres -- '{}' -D '{}/data' -m immediate stop",
            pg_ctl.display(),
            root.display()
        )
    } else {
        format!(
            "'{}' -D '{}/data' -m immediate stop",
            pg_ctl.display(),
            root.display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf '{root}'",
        pid = std::process::id(),
        root = root.display()
    );
    // The shell starts the watcher in the background and exits at once (waited for
    // here); the watcher, in a session of its own, outlives this process.
    let started = Command::new("setsid")
        .args(["sh", "-c", &format!("({script}) &")])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("the cluster's watcher starts");
    assert!(started.success(), "the cluster's watcher did not start");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn random_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}
