// Health probe for the local Kafka broker, used by scripts/stack.
// Compiled once into $HERALD_CACHE against the broker's own lib dir (kafka-clients).
//
//   java -cp <classes>:<kafka lib>/* KafkaProbe <bootstrap> ping
//       cheap check: the broker answers DescribeCluster.
//   java -cp <classes>:<kafka lib>/* KafkaProbe <bootstrap> roundtrip <topic>
//       real check: create <topic> (auto-creation is off on purpose), produce one record
//       inside a transaction (this also proves the transaction coordinator and its
//       replication-factor-1 state topic work), read it back with read_committed.
//
// Prints one line "ok ..." on success; exits 1 with a reason on stderr otherwise.
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.common.utils.AppInfoParser;

public final class KafkaProbe {
    private static final int TIMEOUT_MS = 15_000;

    public static void main(String[] args) {
        if (args.length < 2) {
            System.err.println("usage: KafkaProbe <bootstrap> ping | roundtrip <topic>");
            System.exit(2);
        }
        try {
            String bootstrap = args[0];
            switch (args[1]) {
                case "ping":
                    ping(bootstrap);
                    break;
                case "roundtrip":
                    roundtrip(bootstrap, args.length > 2 ? args[2] : "herald-stack-probe");
                    break;
                default:
                    System.err.println("unknown mode " + args[1]);
                    System.exit(2);
            }
            System.exit(0);
        } catch (Throwable t) {
            Throwable c = t instanceof ExecutionException && t.getCause() != null ? t.getCause() : t;
            System.err.println("kafka probe failed: " + c);
            System.exit(1);
        }
    }

    private static Properties common(String bootstrap) {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, TIMEOUT_MS);
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, TIMEOUT_MS);
        p.put(AdminClientConfig.CLIENT_ID_CONFIG, "herald-stack-probe");
        return p;
    }

    private static void ping(String bootstrap) throws Exception {
        try (Admin admin = Admin.create(common(bootstrap))) {
            int nodes = admin.describeCluster().nodes().get(TIMEOUT_MS, TimeUnit.MILLISECONDS).size();
            String id = admin.describeCluster().clusterId().get(TIMEOUT_MS, TimeUnit.MILLISECONDS);
            System.out.println("ok nodes=" + nodes + " cluster=" + id + " version=" + AppInfoParser.getVersion());
        }
    }

    private static void roundtrip(String bootstrap, String topic) throws Exception {
        long t0 = System.nanoTime();
        try (Admin admin = Admin.create(common(bootstrap))) {
            try {
                admin.createTopics(List.of(new NewTopic(topic, 1, (short) 1)))
                     .all().get(TIMEOUT_MS, TimeUnit.MILLISECONDS);
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) throw e;
            }
        }

        String value = "probe-" + UUID.randomUUID();
        Properties pp = common(bootstrap);
        pp.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        pp.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        pp.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, "herald-stack-probe");
        pp.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, TIMEOUT_MS);
        pp.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, TIMEOUT_MS + 1_000);
        RecordMetadata md;
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(pp)) {
            producer.initTransactions();
            producer.beginTransaction();
            md = producer.send(new ProducerRecord<>(topic, 0, "probe", value)).get(TIMEOUT_MS, TimeUnit.MILLISECONDS);
            producer.commitTransaction();
        }

        Properties cp = common(bootstrap);
        cp.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        cp.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        cp.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        cp.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        // assign() + seek(): no consumer group, so no rebalance wait and no committed offsets.
        TopicPartition tp = new TopicPartition(topic, md.partition());
        try (KafkaConsumer<String, String> consumer = new KafkaConsumer<>(cp)) {
            consumer.assign(List.of(tp));
            consumer.seek(tp, md.offset());
            long deadline = System.currentTimeMillis() + TIMEOUT_MS;
            while (System.currentTimeMillis() < deadline) {
                for (ConsumerRecord<String, String> r : consumer.poll(Duration.ofMillis(500))) {
                    if (value.equals(r.value())) {
                        long ms = (System.nanoTime() - t0) / 1_000_000;
                        System.out.println("ok topic=" + topic + " offset=" + r.offset()
                                + " roundtrip_ms=" + ms + " version=" + AppInfoParser.getVersion());
                        return;
                    }
                }
            }
        }
        throw new IllegalStateException("produced " + value + " at " + tp + "@" + md.offset()
                + " but did not read it back within " + TIMEOUT_MS + " ms");
    }
}
