// Health probe for the local Cassandra node, used by scripts/stack.
// Compiled once into $HERALD_CACHE against the CQL Java driver fetched by probe/pom.xml.
//
//   java -cp <classes>:<probe lib>/* CqlProbe <host> <port>
//
// Connects over the CQL native protocol and runs SELECT release_version FROM system.local.
// Prints "ok version=<release_version>" on success; exits 1 with a reason otherwise.
import java.net.InetSocketAddress;
import java.time.Duration;

import com.datastax.oss.driver.api.core.CqlSession;
import com.datastax.oss.driver.api.core.config.DefaultDriverOption;
import com.datastax.oss.driver.api.core.config.DriverConfigLoader;
import com.datastax.oss.driver.api.core.cql.Row;

public final class CqlProbe {
    public static void main(String[] args) {
        if (args.length != 2) {
            System.err.println("usage: CqlProbe <host> <port>");
            System.exit(2);
        }
        // Short timeouts, no reconnection and no schema/token metadata: the probe is
        // retried by the caller and must answer quickly either way.
        DriverConfigLoader config = DriverConfigLoader.programmaticBuilder()
                .withDuration(DefaultDriverOption.CONNECTION_CONNECT_TIMEOUT, Duration.ofSeconds(5))
                .withDuration(DefaultDriverOption.CONNECTION_INIT_QUERY_TIMEOUT, Duration.ofSeconds(5))
                .withDuration(DefaultDriverOption.CONTROL_CONNECTION_TIMEOUT, Duration.ofSeconds(5))
                .withDuration(DefaultDriverOption.REQUEST_TIMEOUT, Duration.ofSeconds(10))
                .withBoolean(DefaultDriverOption.RECONNECT_ON_INIT, false)
                .withBoolean(DefaultDriverOption.METADATA_SCHEMA_ENABLED, false)
                .withBoolean(DefaultDriverOption.METADATA_TOKEN_MAP_ENABLED, false)
                .build();
        try (CqlSession session = CqlSession.builder()
                .addContactPoint(new InetSocketAddress(args[0], Integer.parseInt(args[1])))
                .withLocalDatacenter("datacenter1")  // SimpleSnitch's data center
                .withConfigLoader(config)
                .build()) {
            Row row = session.execute("SELECT release_version FROM system.local").one();
            if (row == null) throw new IllegalStateException("system.local returned no row");
            System.out.println("ok version=" + row.getString("release_version"));
            System.exit(0);
        } catch (Throwable t) {
            System.err.println("cql probe failed: " + t);
            System.exit(1);
        }
    }
}
