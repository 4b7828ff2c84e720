//! Outbox partitions: how rows are divided among relays.

use uuid::Uuid;
use xxhash_rust::xxh3::xxh3_64;

/// Number of outbox partitions. Fixed by the schema (`CHECK (partition < 32)`).
///
/// Every row belongs to one partition, derived from its key, so all rows of a
/// key share one and relays can split work by partition without breaking
/// per-key order. This is unrelated to the Kafka topic's partition count.
pub const PARTITIONS: u16 = 32;

/// The outbox partition of a row: a stable hash (XXH3-64) of the key modulo
/// [`PARTITIONS`], or of the message id for a row without a key.
///
/// The hash is part of the storage format: the same key maps to the same
/// partition in every version of consign.
#[must_use]
pub fn partition_for(key: Option<&str>, id: &Uuid) -> i16 {
    let hash = match key {
        Some(key) => xxh3_64(key.as_bytes()),
        None => xxh3_64(id.as_bytes()),
    };
    let partition = hash % u64::from(PARTITIONS);
    i16::try_from(partition).expect("a value below PARTITIONS fits in i16")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_partition_and_values_are_stable() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(
            partition_for(Some("order-1"), &a),
            partition_for(Some("order-1"), &b)
        );
        // Golden values: changing the hash would move keys between partitions
        // of databases that already hold rows, which breaks per-key order.
        let golden = ["order-1", "", "customer-42"].map(|k| partition_for(Some(k), &a));
        assert_eq!(golden, GOLDEN);
    }

    const GOLDEN: [i16; 3] = [22, 2, 1];

    #[test]
    fn keys_spread_over_all_partitions() {
        let id = Uuid::now_v7();
        let mut seen = [0u32; PARTITIONS as usize];
        for i in 0..10_000 {
            let p = partition_for(Some(&format!("key-{i}")), &id);
            seen[usize::try_from(p).unwrap()] += 1;
        }
        // 10 000 keys over 32 partitions: about 312 each.
        assert!(seen.iter().all(|&n| (200..450).contains(&n)), "{seen:?}");
    }
}
