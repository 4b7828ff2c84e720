//! The `consign-relay` binary and the test consumer as child processes, for
//! crash tests.

use std::{
    ffi::OsStr,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Environment variable with the path of a prebuilt `consign-relay`.
pub const RELAY_BIN_ENV: &str = "TEST_RELAY_BIN";

/// Environment variable with the path of a prebuilt `consign-test-consumer`.
pub const CONSUMER_BIN_ENV: &str = "TEST_CONSUMER_BIN";

type Built = OnceLock<Result<PathBuf, String>>;

/// The path in `env_var` if set, otherwise binary `bin` of the package at
/// `manifest` (relative to test-support), built once per test process.
fn binary(cell: &'static Built, env_var: &str, manifest: &str, bin: &str) -> Result<PathBuf> {
    cell.get_or_init(|| {
        if let Some(path) = std::env::var_os(env_var) {
            return Ok(PathBuf::from(path));
        }
        escargot::CargoBuild::new()
            .manifest_path(Path::new(env!("CARGO_MANIFEST_DIR")).join(manifest))
            .bin(bin)
            .current_release()
            .run()
            .map(|built| built.path().to_path_buf())
            .map_err(|e| format!("building {bin}: {e}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The `consign-relay` binary: `TEST_RELAY_BIN` if set, otherwise built
/// once per test process with cargo.
///
/// # Errors
/// If the build fails.
pub fn relay_binary() -> Result<PathBuf> {
    static BIN: Built = OnceLock::new();
    binary(&BIN, RELAY_BIN_ENV, "../cli/Cargo.toml", "consign-relay")
}

/// The `consign-test-consumer` binary (an inbox consumer whose handler
/// records each effect in `test_effects`): `TEST_CONSUMER_BIN` if set,
/// otherwise built once per test process with cargo.
///
/// # Errors
/// If the build fails.
pub fn consumer_binary() -> Result<PathBuf> {
    static BIN: Built = OnceLock::new();
    binary(
        &BIN,
        CONSUMER_BIN_ENV,
        "Cargo.toml",
        "consign-test-consumer",
    )
}

/// A child process with its output in a log file in a temporary directory.
/// Killed when dropped.
#[derive(Debug)]
pub struct ChildProcess {
    child: Child,
    dir: tempfile::TempDir,
}

/// A running `consign-relay`.
pub type RelayProcess = ChildProcess;

impl ChildProcess {
    /// Starts `binary` with `args`, output to a log file in `dir`. The test
    /// decides the child's whole configuration: nothing from the
    /// developer's shell (`CONSIGN_*`, `DATABASE_URL`) leaks into it, only
    /// `env`.
    fn spawn(
        binary: &Path,
        dir: tempfile::TempDir,
        args: &[&OsStr],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let log = File::create(dir.path().join("output.log"))?;
        let mut command = Command::new(binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CONSIGN_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child, dir })
    }

    /// Starts `consign-test-consumer` with `env` (see its source for the
    /// variables it reads).
    ///
    /// # Errors
    /// If the binary cannot be built or started.
    pub fn start_consumer(env: &[(&str, &str)]) -> Result<Self> {
        Self::spawn(&consumer_binary()?, tempfile::tempdir()?, &[], env)
    }

    /// Writes `config` (TOML) to a file and starts `consign-relay run` on it.
    ///
    /// # Errors
    /// If the binary cannot be built or started.
    pub fn start(config: &str) -> Result<Self> {
        Self::start_with(config, &["run"], &[])
    }

    /// Runs a `consign-relay` command (`status`, `config check`, ...) with
    /// `config` to its end, for at most 30 s; returns whether it succeeded
    /// and its output.
    ///
    /// # Panics
    /// If it cannot start or does not end in time.
    pub async fn command(config: &str, args: &[&str]) -> (bool, String) {
        let mut command = Self::start_with(config, args, &[]).expect("start consign-relay");
        let status = command
            .wait(Duration::from_secs(30))
            .await
            .expect("consign-relay command ended");
        (status.success(), command.output())
    }

    /// Like [`RelayProcess::start`] with other arguments after `--config`
    /// and extra environment variables.
    ///
    /// # Errors
    /// If the binary cannot be built or started.
    pub fn start_with(config: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("relay.toml");
        File::create(&config_path)?.write_all(config.as_bytes())?;
        let mut all: Vec<&OsStr> = vec![OsStr::new("--config"), config_path.as_os_str()];
        all.extend(args.iter().map(OsStr::new));
        Self::spawn(&relay_binary()?, dir, &all, env)
    }

    /// Starts `consign-relay` with `args` and `env` only: no configuration
    /// file unless `env` or `args` name one.
    ///
    /// # Errors
    /// If the binary cannot be built or started.
    pub fn start_relay(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        Self::spawn(&relay_binary()?, tempfile::tempdir()?, &args, env)
    }

    /// Everything the process printed so far.
    #[must_use]
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default()
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    ///
    /// # Errors
    /// If the signal cannot be sent.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Freezes the process with SIGSTOP (a long GC pause, a stalled VM).
    ///
    /// # Errors
    /// If the signal cannot be sent.
    pub fn pause(&self) -> Result<()> {
        kill(self.pid()?, Signal::SIGSTOP)?;
        Ok(())
    }

    /// Lets a paused process run again (SIGCONT).
    ///
    /// # Errors
    /// If the signal cannot be sent.
    pub fn resume(&self) -> Result<()> {
        kill(self.pid()?, Signal::SIGCONT)?;
        Ok(())
    }

    /// The process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    fn pid(&self) -> Result<Pid> {
        Ok(Pid::from_raw(i32::try_from(self.child.id())?))
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    ///
    /// # Errors
    /// If the relay does not exit in time (it is then killed).
    pub async fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        kill(self.pid()?, Signal::SIGTERM)?;
        self.wait(timeout).await
    }

    /// Sends SIGTERM and expects exit status 0 within `timeout`.
    ///
    /// # Errors
    /// If it exits otherwise (the error holds its output) or not in time.
    pub async fn stop(&mut self, timeout: Duration) -> Result<()> {
        let status = self.terminate(timeout).await?;
        if !status.success() {
            bail!("exited with {status}:\n{}", self.output());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the relay to exit by itself.
    ///
    /// Asynchronous so the test's own tasks keep running meanwhile: a
    /// proxy or tap the child talks through lives on the test's runtime
    /// (often a single thread), and blocking it would hang the child.
    ///
    /// # Errors
    /// If it is still running after `timeout` (it is then killed).
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!(
                    "child process still running after {timeout:?}:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
