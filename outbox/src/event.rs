//! Typed events: a serde type that knows its topic, event type and key.

use serde::Serialize;

/// A domain event that can be enqueued as JSON without spelling out its topic
/// and event type at every call site.
///
/// ```
/// use consign_outbox::{Event, Message};
/// use serde::Serialize;
///
/// #[derive(Serialize)]
/// struct OrderCreated { order_id: u64, total_cents: i64 }
///
/// impl Event for OrderCreated {
///     const TOPIC: &'static str = "orders";
///     const EVENT_TYPE: &'static str = "OrderCreated";
///     fn key(&self) -> Option<String> { Some(self.order_id.to_string()) }
/// }
///
/// let msg = Message::from_event(&OrderCreated { order_id: 7, total_cents: 1250 }).unwrap();
/// assert_eq!(msg.key(), Some("7"));
/// assert_eq!(msg.payload(), br#"{"order_id":7,"total_cents":1250}"#);
/// ```
pub trait Event: Serialize {
    /// The Kafka topic the event goes to.
    const TOPIC: &'static str;
    /// The event type, sent as the header `consign-event-type`.
    const EVENT_TYPE: &'static str;

    /// The key (aggregate id) that orders this event among its kin; `None`
    /// for events that need no order.
    fn key(&self) -> Option<String> {
        None
    }
}
