//! `consign-relay dead-letters`: list, requeue, purge
//! ([`consign_inbox::dead_letters`]).

use consign_inbox::{InboxBackend, dead_letters};
use consign_outbox::Outbox;
use consign_relay::Config;
use consign_relay::DatabasePool;
use sqlx::Pool;

use crate::{
    args::DeadLetterCommand,
    commands::{database, print_json, with_pool},
    error::Result,
};

/// Runs a `dead-letters` command.
pub(crate) async fn command(config: &Config, command: DeadLetterCommand) -> Result<()> {
    with_pool!(&database(config)?, pool => on(pool, command).await)
}

async fn on<DB: InboxBackend>(pool: &Pool<DB>, command: DeadLetterCommand) -> Result<()> {
    match command {
        DeadLetterCommand::List {
            select,
            limit,
            json,
        } => {
            let letters = dead_letters::list(pool, &select.selection(true)?, limit).await?;
            if json {
                print_json(&letters);
                return Ok(());
            }
            println!(
                "{:>8} {:<20} {:<24} {:>12} {:<16} {:>3} {:<20} ERROR",
                "ID", "CONSUMER", "TOPIC", "PART/OFFSET", "KEY", "TRY", "FAILED AT"
            );
            for l in &letters {
                println!(
                    "{:>8} {:<20} {:<24} {:>12} {:<16} {:>3} {:<20} {}",
                    l.id,
                    l.consumer,
                    l.topic,
                    format!("{}/{}", l.partition, l.offset),
                    l.key.as_deref().unwrap_or("-"),
                    l.attempts,
                    l.failed_at.format("%Y-%m-%d %H:%M:%S"),
                    l.error
                );
            }
            println!("{} dead letters", letters.len());
        }
        DeadLetterCommand::Requeue { select, json } => {
            let done =
                dead_letters::requeue(pool, &Outbox::new(), &select.selection(false)?).await?;
            if json {
                print_json(&done);
                return Ok(());
            }
            for (id, message) in &done.requeued {
                println!("requeued dead letter {id} as message {message}");
            }
            for (id, reason) in &done.skipped {
                println!("kept dead letter {id}: {reason}");
            }
            println!(
                "{} requeued, {} kept",
                done.requeued.len(),
                done.skipped.len()
            );
        }
        DeadLetterCommand::Purge { select, json } => {
            let purged = dead_letters::purge(pool, &select.selection(false)?).await?;
            if json {
                print_json(&serde_json::json!({ "purged": purged }));
            } else {
                println!("purged {purged} dead letters");
            }
        }
    }
    Ok(())
}
