//! Faults on a running cluster: kill, stop, pause, resume and restart
//! nodes.

use std::time::Duration;

use anyhow::{Result, bail};
use nix::sys::signal::Signal;

use super::KafkaCluster;

impl KafkaCluster {
    /// Kills node `id` with SIGKILL (a crash: no controlled shutdown) and
    /// reaps it.
    ///
    /// # Errors
    /// If the node is not running.
    pub fn kill(&self, id: i32) -> Result<()> {
        self.with_node(id, |node, _, _| {
            node.signal(Signal::SIGKILL)?;
            node.reap(Duration::from_secs(30))
        })
    }

    /// Stops node `id` with SIGTERM (controlled shutdown: leadership moves
    /// first) and waits up to 60 s for it to exit.
    ///
    /// # Errors
    /// If the node is not running.
    pub fn stop(&self, id: i32) -> Result<()> {
        self.with_node(id, |node, _, _| {
            node.signal(Signal::SIGTERM)?;
            node.reap(Duration::from_secs(60))
        })
    }

    /// Freezes node `id` (SIGSTOP): its connections stay open but nothing
    /// answers, like a long GC pause or a stalled VM.
    ///
    /// # Errors
    /// If the node is not running.
    pub fn pause(&self, id: i32) -> Result<()> {
        self.with_node(id, |node, _, _| node.signal(Signal::SIGSTOP))
    }

    /// Lets a paused node run again (SIGCONT).
    ///
    /// # Errors
    /// If the node is not running.
    pub fn resume(&self, id: i32) -> Result<()> {
        self.with_node(id, |node, _, _| node.signal(Signal::SIGCONT))
    }

    /// Starts a killed or stopped node again on its data and ports, and
    /// waits until it is back in the cluster's metadata.
    ///
    /// # Errors
    /// If it is running already or does not rejoin within 90 s.
    pub fn restart(&self, id: i32) -> Result<()> {
        self.with_node(id, |node, libs, dir| {
            if node.process.is_some() {
                bail!("Kafka node {id} is running");
            }
            node.spawn(libs, dir)
        })?;
        let running = self.lock().iter().filter(|n| n.process.is_some()).count();
        self.wait_for_brokers(running, Duration::from_secs(90))
    }

    /// Kills every node (SIGKILL).
    ///
    /// # Errors
    /// If a node cannot be signalled.
    pub fn kill_all(&self) -> Result<()> {
        self.node_ids().into_iter().try_for_each(|id| self.kill(id))
    }

    /// Starts every node that is not running and waits for all of them.
    ///
    /// # Errors
    /// If a node does not rejoin within 90 s.
    pub fn restart_all(&self) -> Result<()> {
        for id in self.node_ids() {
            self.with_node(id, |node, libs, dir| {
                if node.process.is_none() {
                    node.spawn(libs, dir)?;
                }
                Ok(())
            })?;
        }
        let nodes = self.node_ids().len();
        self.wait_for_brokers(nodes, Duration::from_secs(90))
    }
}
