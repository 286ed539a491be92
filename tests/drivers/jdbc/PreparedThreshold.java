/*
 * The PostgreSQL JDBC driver (pgjdbc) at its default prepareThreshold through pgproxy in
 * transaction mode.
 *
 * Usage: java -cp .:postgresql.jar PreparedThreshold [HOST PORT USER PASSWORD DATABASE]
 * (missing arguments come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).
 * Run by tests/e2e/test_other_drivers.py against a proxy whose pool is smaller than THREADS.
 *
 * pgjdbc runs a PreparedStatement with the unnamed statement for its first prepareThreshold - 1
 * (4) executions; from the fifth on it sends Parse once with a server-side name, S_1, S_2, ...
 * numbered per connection, and afterwards only Bind/Execute. Every thread here has its own
 * connection and prepares statements in the same order, so every connection has an S_1, an S_2,
 * ... but each with a different SQL text, even a different parameter count; a proxy that let one
 * connection's Bind reach another's statement would return wrong rows or fail. Every row is
 * checked. Exits 0 after printing one line starting with "OK", or 1 after printing
 * "FAIL: ..." with what was expected and what came back.
 */

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.CompletionService;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CyclicBarrier;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorCompletionService;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

import org.postgresql.PGStatement;

public final class PreparedThreshold {
    static final int THREADS = Integer.parseInt(env("THREADS", "6"));
    static final int EXECUTIONS = 20;
    static final int ROWS_PER_TRANSACTION = 10;

    static String url;
    static final Properties props = new Properties();
    static final String table = "jdbc_threshold_" + ProcessHandle.current().pid();
    static final Set<Integer> backends = ConcurrentHashMap.newKeySet();
    static final AtomicInteger executions = new AtomicInteger();

    static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    static String arg(String[] args, int index, String envName, String fallback) {
        return args.length > index ? args[index] : env(envName, fallback);
    }

    static void check(String what, Object actual, Object expected) {
        if (!Objects.equals(actual, expected)) {
            throw new AssertionError(what + ": expected " + expected + ", got " + actual);
        }
    }

    /** Runs `ps` once; returns its single row as a list of column values. */
    static List<Object> row(PreparedStatement ps, String what) throws SQLException {
        executions.incrementAndGet();
        try (ResultSet rs = ps.executeQuery()) {
            if (!rs.next()) {
                throw new AssertionError(what + ": expected one row, got none");
            }
            List<Object> values = new ArrayList<>();
            for (int c = 1; c <= rs.getMetaData().getColumnCount(); c++) {
                values.add(rs.getObject(c));
            }
            if (rs.next()) {
                throw new AssertionError(what + ": expected one row, got more");
            }
            return values;
        }
    }

    static void serverPrepared(PreparedStatement ps, String what) throws SQLException {
        if (!ps.unwrap(PGStatement.class).isUseServerPrepare()) {
            throw new AssertionError(what + ": pgjdbc did not switch to a named statement");
        }
    }

    static Connection connect() throws SQLException {
        return DriverManager.getConnection(url, props);
    }

    /** One thread's work on its own connection; `i` makes its SQL texts its own. */
    static void work(int i, CyclicBarrier barrier) throws Exception {
        try (Connection conn = connect()) {
            barrier.await(30, TimeUnit.SECONDS);
            // Prepared in the same order on every connection, so they get the same S_n names.
            PreparedStatement a = conn.prepareStatement(
                    "SELECT ?::int + " + i + " AS v, " + i + " AS thread, pg_backend_pid() AS pid");
            PreparedStatement b = conn.prepareStatement(i % 2 == 0
                    ? "SELECT ?::int * " + (i + 2) + " AS v"
                    : "SELECT ?::text || '-' || ?::text || '-t" + i + "' AS v");
            PreparedStatement div = conn.prepareStatement("SELECT " + (i * 100) + " / ?::int AS v");
            for (int round = 0; round < EXECUTIONS; round++) {
                String where = "thread " + i + " execution " + (round + 1);
                a.setInt(1, round);
                List<Object> got = row(a, where + " of a");
                check(where + " of a", got.subList(0, 2), List.of(round + i, i));
                backends.add((Integer) got.get(2));
                if (i % 2 == 0) {
                    b.setInt(1, round);
                    check(where + " of b", row(b, where), List.of(round * (i + 2)));
                } else {
                    b.setString(1, "r" + round);
                    b.setString(2, "x");
                    check(where + " of b", row(b, where), List.of("r" + round + "-x-t" + i));
                }
                // An error from a (named) statement leaves it usable on the next server.
                div.setInt(1, round % 4 == 3 ? 0 : 4);
                if (round % 4 == 3) {
                    try {
                        row(div, where + " of div by 0");
                        throw new AssertionError(where + " of div by 0: no error");
                    } catch (SQLException e) {
                        check(where + " of div by 0: SQLSTATE", e.getSQLState(), "22012");
                    }
                } else {
                    check(where + " of div", row(div, where), List.of(i * 25));
                }
            }
            serverPrepared(a, "thread " + i + " statement a");
            serverPrepared(b, "thread " + i + " statement b");
            serverPrepared(div, "thread " + i + " statement div");

            // A committed transaction: its statements pass the threshold inside it.
            PreparedStatement insert = conn.prepareStatement(
                    "INSERT INTO " + table + " (client, n) VALUES (" + i + ", ?)");
            PreparedStatement pid = conn.prepareStatement("SELECT pg_backend_pid() AS pid, " + i);
            PreparedStatement count = conn.prepareStatement(
                    "SELECT count(*)::int FROM " + table + " WHERE client = " + i);
            conn.setAutoCommit(false);
            List<Object> first = row(pid, "thread " + i + " pid in transaction");
            for (int n = 0; n < ROWS_PER_TRANSACTION; n++) {
                insert.setInt(1, n);
                executions.incrementAndGet();
                check("thread " + i + " insert " + n, insert.executeUpdate(), 1);
                check("thread " + i + " pid in transaction", row(pid, "pid"), first);
            }
            serverPrepared(insert, "thread " + i + " statement insert");
            check("thread " + i + " count inside the transaction",
                    row(count, "count"), List.of(ROWS_PER_TRANSACTION));
            conn.commit();
            check("thread " + i + " count after commit",
                    row(count, "count"), List.of(ROWS_PER_TRANSACTION));
            conn.commit();

            // A rolled-back one: its row is gone.
            insert.setInt(1, 99);
            executions.incrementAndGet();
            insert.executeUpdate();
            check("thread " + i + " count inside the rolled-back transaction",
                    row(count, "count"), List.of(ROWS_PER_TRANSACTION + 1));
            conn.rollback();
            conn.setAutoCommit(true);
            check("thread " + i + " count after rollback",
                    row(count, "count"), List.of(ROWS_PER_TRANSACTION));
        }
    }

    public static void main(String[] args) throws Exception {
        String host = arg(args, 0, "PGHOST", "127.0.0.1");
        String port = arg(args, 1, "PGPORT", "5432");
        props.setProperty("user", arg(args, 2, "PGUSER", ""));
        props.setProperty("password", arg(args, 3, "PGPASSWORD", ""));
        String database = arg(args, 4, "PGDATABASE", "");
        props.setProperty("connectTimeout", "15");
        props.setProperty("socketTimeout", "60");
        props.setProperty("ApplicationName", "pgproxy-jdbc-prepared-threshold");
        // prepareThreshold is deliberately left at the driver's default (5).
        url = "jdbc:postgresql://" + host + ":" + port + "/" + database;

        ExecutorService pool = Executors.newFixedThreadPool(THREADS);
        try (Connection admin = connect(); Statement st = admin.createStatement()) {
            st.execute("CREATE TABLE " + table + " (client int NOT NULL, n int NOT NULL)");
            try {
                CyclicBarrier barrier = new CyclicBarrier(THREADS);
                // Results in the order they finish, so the first failure is reported at once.
                CompletionService<Integer> done = new ExecutorCompletionService<>(pool);
                for (int t = 0; t < THREADS; t++) {
                    final int i = t;
                    done.submit(() -> {
                        try {
                            work(i, barrier);
                        } catch (Exception | AssertionError e) {
                            barrier.reset(); // the others fail fast instead of waiting for it
                            throw new AssertionError("thread " + i + " failed: " + e, e);
                        }
                        return i;
                    });
                }
                long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(90);
                for (int t = 0; t < THREADS; t++) {
                    Future<Integer> next = done.poll(deadline - System.nanoTime(), TimeUnit.NANOSECONDS);
                    if (next == null) {
                        throw new AssertionError((THREADS - t) + " threads not finished after 90 s");
                    }
                    try {
                        next.get();
                    } catch (ExecutionException e) {
                        throw e.getCause();
                    }
                }
                try (ResultSet rs = st.executeQuery("SELECT count(*)::int FROM " + table)) {
                    rs.next();
                    check("rows committed by all threads", rs.getInt(1), THREADS * ROWS_PER_TRANSACTION);
                }
                String version = admin.getMetaData().getDriverVersion();
                System.out.println("OK pgjdbc " + version + ": " + THREADS + " threads, "
                        + executions.get() + " executions past prepareThreshold "
                        + admin.unwrap(org.postgresql.PGConnection.class).getPrepareThreshold()
                        + ", transactions committed and rolled back, backends=" + backends.size());
            } finally {
                st.execute("DROP TABLE IF EXISTS " + table);
            }
        } catch (Throwable e) {
            System.err.println("FAIL: " + e);
            Throwable cause = e.getCause();
            for (; cause != null; cause = cause.getCause()) {
                System.err.println("  caused by: " + cause);
            }
            e.printStackTrace();
            System.exit(1);
        } finally {
            pool.shutdownNow();
        }
        System.exit(0);
    }
}
