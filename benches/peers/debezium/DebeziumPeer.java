/*
 * Debezium's embedded engine as the peer of consign's side-by-side benchmark
 * (benches/peers.rs): the PostgreSQL connector reads a Debezium-shaped outbox
 * table through pgoutput, the outbox event router
 * (io.debezium.transforms.outbox.EventRouter) turns each insert into the
 * event it describes, and a Kafka producer sends it, as Debezium Server's
 * Kafka sink does: a batch is sent whole, every send is awaited, then its
 * offsets are marked processed (at least once: what was sent but not yet
 * flushed to the offset file is sent again after a crash).
 *
 * Run by benches/peers.rs with Java's source launcher:
 *   java -cp '<jars>/*' DebeziumPeer.java <properties file>
 * Properties named producer.* configure the Kafka producer (prefix removed);
 * all others configure the engine and the connector. Prints "peer: streaming"
 * on stdout once the connector task runs.
 */

import io.debezium.embedded.Connect;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.RecordChangeEvent;
import io.debezium.engine.format.ChangeEventFormat;
import java.io.FileInputStream;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.atomic.AtomicBoolean;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.connect.header.Header;
import org.apache.kafka.connect.source.SourceRecord;

public final class DebeziumPeer {
    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: DebeziumPeer <properties file>");
            System.exit(2);
        }
        Properties all = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            all.load(in);
        }
        Properties engineProps = new Properties();
        Properties producerProps = new Properties();
        for (String name : all.stringPropertyNames()) {
            if (name.startsWith("producer.")) {
                producerProps.put(name.substring("producer.".length()), all.getProperty(name));
            } else {
                engineProps.put(name, all.getProperty(name));
            }
        }
        producerProps.put("key.serializer", ByteArraySerializer.class.getName());
        producerProps.put("value.serializer", ByteArraySerializer.class.getName());
        KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(producerProps);

        DebeziumEngine.ChangeConsumer<RecordChangeEvent<SourceRecord>> sink = (records, committer) -> {
            List<Future<RecordMetadata>> acks = new ArrayList<>(records.size());
            for (RecordChangeEvent<SourceRecord> event : records) {
                SourceRecord record = event.record();
                RecordHeaders headers = new RecordHeaders();
                for (Header header : record.headers()) {
                    headers.add(header.key(), bytes(header.value()));
                }
                acks.add(producer.send(new ProducerRecord<>(
                        record.topic(), null, bytes(record.key()), bytes(record.value()), headers)));
            }
            for (int i = 0; i < records.size(); i++) {
                try {
                    acks.get(i).get();
                } catch (ExecutionException e) {
                    // Stops the engine: nothing of this batch is marked, so
                    // it is read again from the slot on restart.
                    throw new RuntimeException("Kafka refused a record", e.getCause());
                }
                committer.markProcessed(records.get(i));
            }
            committer.markBatchFinished();
        };

        CountDownLatch stopped = new CountDownLatch(1);
        AtomicBoolean failed = new AtomicBoolean();
        DebeziumEngine<RecordChangeEvent<SourceRecord>> engine = DebeziumEngine
                .create(ChangeEventFormat.of(Connect.class))
                .using(engineProps)
                .notifying(sink)
                .using(new DebeziumEngine.ConnectorCallback() {
                    @Override
                    public void taskStarted() {
                        System.out.println("peer: streaming");
                        System.out.flush();
                    }
                })
                .using((success, message, error) -> {
                    if (!success) {
                        failed.set(true);
                        System.err.println("peer: engine stopped: " + message);
                        if (error != null) {
                            error.printStackTrace();
                        }
                    }
                    stopped.countDown();
                })
                .build();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                engine.close();
                stopped.await();
            } catch (Exception e) {
                e.printStackTrace();
            }
            producer.close();
        }));
        Executors.newSingleThreadExecutor().execute(engine);
        stopped.await();
        producer.close();
        System.exit(failed.get() ? 1 : 0);
    }

    /** A key, value or header as Kafka bytes: strings as UTF-8. */
    private static byte[] bytes(Object value) {
        if (value == null) {
            return null;
        }
        if (value instanceof byte[] b) {
            return b;
        }
        if (value instanceof ByteBuffer buffer) {
            byte[] b = new byte[buffer.remaining()];
            buffer.duplicate().get(b);
            return b;
        }
        return value.toString().getBytes(StandardCharsets.UTF_8);
    }
}
