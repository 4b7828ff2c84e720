//! Test certificates, made with the `openssl` command: a CA of its own and
//! server certificates it signs, as PEM files in a directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A throw-away certificate authority.
#[derive(Debug, Clone)]
pub struct TestCa {
    dir: PathBuf,
}

impl TestCa {
    /// Makes a CA (`ca.crt`, `ca.key`) in `dir`, which must exist.
    ///
    /// # Errors
    /// If `openssl` is missing or fails.
    pub fn generate(dir: &Path) -> Result<Self> {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=consign throw-away test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &path(&dir.join("ca.key")),
            "-out",
            &path(&dir.join("ca.crt")),
        ])?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The CA's certificate (PEM): what a client trusts.
    #[must_use]
    pub fn certificate(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A server certificate for `localhost` and `127.0.0.1`, signed by this
    /// CA: `<name>.crt` and `<name>.key` (unencrypted PKCS#8), and
    /// `<name>.pem` holding both, key first (a Kafka PEM keystore).
    ///
    /// # Errors
    /// If `openssl` fails.
    pub fn server(&self, name: &str) -> Result<PathBuf> {
        let file = |ext: &str| path(&self.dir.join(format!("{name}.{ext}")));
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &file("key"),
            "-out",
            &file("csr"),
        ])?;
        let ext = self.dir.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &file("csr"),
            "-CA",
            &path(&self.certificate()),
            "-CAkey",
            &path(&self.dir.join("ca.key")),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &path(&ext),
            "-out",
            &file("crt"),
        ])?;
        let pem = self.dir.join(format!("{name}.pem"));
        let both = std::fs::read_to_string(file("key"))? + &std::fs::read_to_string(file("crt"))?;
        std::fs::write(&pem, both)?;
        Ok(pem)
    }
}

fn path(path: &Path) -> String {
    path.display().to_string()
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running `openssl` (Debian: apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
