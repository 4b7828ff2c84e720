//! `run`: the relay as a process (signals, logging, admin endpoint).

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use consign_relay::{Config, Relay};

use crate::error::{Error, Result};

/// `run`: the relay until SIGTERM or SIGINT, with the admin endpoint if
/// enabled.
pub(crate) async fn run(config: Config) -> Result<()> {
    config.validate()?;
    crate::commands::check_sqlite(&config).await?;
    let relay = Relay::builder(config.database.connect_lazy()?)
        .kafka_properties(config.kafka_properties())
        .settings(config.relay)
        .sample_interval(config.admin.sample_interval)
        .database_deadline(config.database.deadline())
        .build()?;
    let shutdown = CancellationToken::new();
    if config.admin.enabled {
        let metrics = consign_relay::metrics::install_prometheus().map_err(Error::Metrics)?;
        let listen = config.admin.listen;
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            consign_relay::Error::config("admin.listen", format!("cannot listen on {listen}: {e}"))
        })?;
        let address = listener.local_addr().unwrap_or(listen);
        tracing::info!(%address, "serving /metrics and /health");
        let (health, stop) = (relay.health(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(error) = crate::admin::serve(listener, health, Some(metrics), stop).await {
                tracing::error!(%error, "the admin endpoint failed");
            }
        });
    }
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    Ok(relay.run(shutdown).await?)
}

/// Cancels `token` on SIGTERM or SIGINT.
async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the relay with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the batch in flight"),
        _ = int.recv() => tracing::info!("SIGINT: finishing the batch in flight"),
    }
    token.cancel();
}

pub(crate) fn init_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
