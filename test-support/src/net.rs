//! Network helpers: a TCP proxy that can cut a connection (to take
//! PostgreSQL "down" for one process without stopping the shared server),
//! and a minimal HTTP GET for the relay's admin endpoint.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use sqlx::ConnectOptions;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
    task::JoinHandle,
};

/// Forwards a local port to `target`. While cut, existing connections are
/// closed and new ones are closed at once. While frozen, connections stay
/// open but nothing passes either way (a server that hangs, or a network
/// that drops packets without resets). [`black_hole`](Self::black_hole)
/// silences the connections open at that moment for good while new ones
/// pass (a route that dropped its established flows, a NAT that forgot
/// them).
pub struct TcpProxy {
    address: SocketAddr,
    cut: Arc<AtomicBool>,
    frozen: watch::Sender<bool>,
    generation: watch::Sender<u64>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `target`.
    ///
    /// # Errors
    /// If no port can be bound.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let (frozen, thawed) = watch::channel(false);
        let (generation, current) = watch::channel(0_u64);
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (cut, connections) = (Arc::clone(&cut), Arc::clone(&connections));
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let lane = Lane {
                        frozen: thawed.clone(),
                        generation: current.clone(),
                        born: *current.borrow(),
                    };
                    let task = tokio::spawn(forward(client, target, lane));
                    let mut connections =
                        connections.lock().unwrap_or_else(PoisonError::into_inner);
                    connections.retain(|t| !t.is_finished());
                    connections.push(task);
                }
            }
        });
        Ok(Self {
            address,
            cut,
            frozen,
            generation,
            connections,
            accept,
        })
    }

    /// A proxy to the PostgreSQL server of `pool`, and the URL of `pool`'s
    /// database through it.
    ///
    /// # Errors
    /// If the server's address does not parse or no port can be bound.
    pub async fn for_database(pool: &sqlx::PgPool) -> Result<(Self, String)> {
        let options = pool.connect_options();
        let target = format!("{}:{}", options.get_host(), options.get_port());
        let proxy = Self::start(target.parse().context("PostgreSQL's address")?).await?;
        let proxied = (*options)
            .clone()
            .host("127.0.0.1")
            .port(proxy.address().port());
        Ok((proxy, proxied.to_url_lossy().to_string()))
    }

    /// The local address clients should connect to.
    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Closes every connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let connections = std::mem::take(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in connections {
            task.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Stops passing bytes, in both directions, on every connection (new
    /// ones are accepted and then wait too) until [`thaw`](Self::thaw).
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Passes bytes again, starting with those held while frozen.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Stops passing bytes, for good and without closing them, on the
    /// connections open now; later connections pass.
    pub fn black_hole(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }
}

/// What a connection's bytes wait for: the proxy thawed, and no black hole
/// since the connection was made.
#[derive(Clone)]
struct Lane {
    frozen: watch::Receiver<bool>,
    generation: watch::Receiver<u64>,
    born: u64,
}

impl Lane {
    /// Whether bytes may pass now; waits while frozen, for ever once
    /// black-holed. `false` when the proxy is gone.
    async fn open(&mut self) -> bool {
        let born = self.born;
        self.frozen.wait_for(|frozen| !frozen).await.is_ok()
            && self
                .generation
                .wait_for(|generation| *generation == born)
                .await
                .is_ok()
    }
}

/// Forwards one client connection to `target`, holding bytes while frozen.
async fn forward(client: TcpStream, target: SocketAddr, frozen: Lane) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Either side closing ends the connection (both halves drop).
    tokio::select! {
        _ = pump(client_read, server_write, frozen.clone()) => {}
        _ = pump(server_read, client_write, frozen) => {}
    }
}

/// Copies `from` to `to` until EOF, waiting before each write while the
/// lane is closed.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut lane: Lane,
) -> std::io::Result<()> {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        if !lane.open().await {
            return Ok(()); // the proxy is gone
        }
        to.write_all(&buffer[..read]).await?;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// `GET path` on `address` with HTTP/1.1; returns the status code and body.
///
/// # Errors
/// If the connection fails, takes over 10 s, or the answer is not HTTP.
pub async fn http_get(address: SocketAddr, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .context("HTTP GET timed out")??;
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        bail!("not an HTTP answer: {answer:?}");
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The value of the Prometheus sample `series` in `text`: a name with
/// labels as in the exposition format (`consign_relay_partition_owned{partition="0"}`),
/// matched whatever the order of the labels.
#[must_use]
pub fn prometheus_value(text: &str, series: &str) -> Option<f64> {
    let wanted = parse_series(series);
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (parse_series(name) == wanted).then(|| value.parse().ok())?
        })
}

/// `name{b="2",a="1"}` → (`name`, [(`a`, `1`), (`b`, `2`)]).
fn parse_series(series: &str) -> (String, Vec<(String, String)>) {
    let Some((name, labels)) = series.split_once('{') else {
        return (series.to_owned(), Vec::new());
    };
    let mut pairs: Vec<(String, String)> = labels
        .trim_end_matches('}')
        .split("\",")
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect();
    pairs.sort();
    (name.to_owned(), pairs)
}
