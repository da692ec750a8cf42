//! A throwaway PostgreSQL cluster in a folder of its own: Debian's `initdb` and `pg_ctl`, the way the
//! tests of the PostgreSQL store and of a studio cluster get a real database. Stopped and removed when
//! dropped. Run as root (a CI container), the server runs as the `postgres` user, since PostgreSQL
//! refuses to run as root.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

pub struct ThrowawayPostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    /// The user the server runs as, when this process is root.
    run_as: Option<String>,
}

/// Where PostgreSQL's server programs are: `STUDIO_POSTGRES_BIN`, else Debian's newest
/// `/usr/lib/postgresql/<version>/bin`, else `initdb` on the PATH.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("STUDIO_POSTGRES_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).find(|p| p.join("initdb").exists()))
        .context(
            "PostgreSQL's server programs (initdb, pg_ctl) were not found: install Debian's \
             postgresql (`bash scripts/postgres` does), or set STUDIO_POSTGRES_BIN to their folder",
        )
}

impl ThrowawayPostgres {
    /// Makes a cluster with a `studio` superuser and a `studio` database, and starts it.
    pub fn start() -> anyhow::Result<ThrowawayPostgres> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "studio-postgres-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let root = std::fs::metadata("/proc/self")?.uid() == 0;
        let run_as = root.then(|| "postgres".to_owned());
        if let Some(user) = &run_as {
            let id = |flag: &str| -> anyhow::Result<u32> {
                let out = Command::new("id").args([flag, user]).output()?;
                anyhow::ensure!(
                    out.status.success(),
                    "running as root, PostgreSQL needs its own user `{user}` (Debian's postgresql \
                     package makes it)"
                );
                Ok(String::from_utf8(out.stdout)?.trim().parse()?)
            };
            std::os::unix::fs::chown(&dir, Some(id("-u")?), Some(id("-g")?))?;
        }
        // A free port, found by binding it; PostgreSQL takes it a moment later.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cluster = ThrowawayPostgres {
            bin,
            dir,
            port,
            run_as,
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "studio",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        cluster.start_server()?;
        cluster.run(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "studio",
                "studio",
            ],
        )?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        let out = command
            .args(args)
            .current_dir(&self.dir)
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} {} failed: {}{}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
        Ok(())
    }

    /// Starts the server (again, after [`ThrowawayPostgres::stop`]) and waits until it accepts.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        )
    }

    /// Stops the server at once, as a crash would (`immediate`: no checkpoint; the next start
    /// recovers from the write-ahead log).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
    }

    /// The `studio` database's URL.
    pub fn url(&self) -> String {
        format!("postgres://studio@127.0.0.1:{}/studio", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
