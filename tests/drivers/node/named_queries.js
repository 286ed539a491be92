'use strict'
/*
 * node-postgres (npm `pg`) named queries through pgproxy in transaction mode.
 *
 * Usage: node named_queries.js [HOST PORT USER PASSWORD DATABASE]
 * (missing arguments come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE).
 * Run by tests/e2e/test_other_drivers.py against a proxy whose pool is smaller than CLIENTS.
 *
 * A query config with a `name` makes node-postgres send Parse(name, text) the first time the
 * name is used on a connection and only Bind/Describe/Execute/Sync afterwards: the driver
 * believes the statement lives on "its" server. Here every client uses the SAME names (q_a,
 * q_b, ...) with a DIFFERENT text, even a different parameter count, so a proxy that sent one
 * client's Bind to a statement another client prepared would give wrong rows or errors. Each
 * client checks every row it gets. Exits 0 after printing one line starting with "OK", or 1
 * after printing "FAIL: ..." with what was expected and what came back.
 */

const { Client } = require('pg')

const CLIENTS = Number(process.env.CLIENTS || 6)
const ROUNDS = Number(process.env.ROUNDS || 60)
const DEADLINE_MS = 90000

const [host, port, user, password, database] = process.argv.slice(2)
const config = {
  host: host || process.env.PGHOST || '127.0.0.1',
  port: Number(port || process.env.PGPORT || 5432),
  user: user || process.env.PGUSER,
  password: password || process.env.PGPASSWORD,
  database: database || process.env.PGDATABASE,
  connectionTimeoutMillis: 15000,
  query_timeout: 30000,
  application_name: 'pgproxy-node-named-queries',
}
const table = `node_named_${process.pid}_${Date.now() % 100000}`

function check(what, actual, expected) {
  const a = JSON.stringify(actual)
  const e = JSON.stringify(expected)
  if (a !== e) {
    throw new Error(`${what}: expected ${e}, got ${a}`)
  }
}

// The texts differ per client for the same name; q_b even changes shape (1 or 2 parameters).
function statements(i) {
  return {
    a: { name: 'q_a', text: `SELECT $1::int + ${i} AS v, ${i} AS client, pg_backend_pid() AS pid` },
    b:
      i % 2 === 0
        ? { name: 'q_b', text: `SELECT $1::int * ${i + 2} AS v` }
        : { name: 'q_b', text: `SELECT $1::text || '-' || $2::text || '-c${i}' AS v` },
    div: { name: 'q_div', text: `SELECT ${i * 100} / $1::int AS v` },
    pid: { name: 'q_pid', text: `SELECT pg_backend_pid() AS pid, ${i} AS client` },
    ins: { name: 'q_ins', text: `INSERT INTO ${table} (client, n) VALUES (${i}, $1::int)` },
    count: { name: 'q_count', text: `SELECT count(*)::int AS n FROM ${table} WHERE client = ${i}` },
  }
}

async function one(client, i, backends) {
  const q = statements(i)
  let executions = 0
  const run = async (stmt, values) => {
    executions++
    return (await client.query({ ...stmt, values })).rows
  }
  for (let round = 0; round < ROUNDS; round++) {
    const where = `client ${i} round ${round}`
    const rows = await run(q.a, [round])
    check(`${where} q_a`, rows.map((r) => ({ v: r.v, client: r.client })), [{ v: round + i, client: i }])
    backends.add(rows[0].pid)
    if (i % 2 === 0) {
      check(`${where} q_b`, await run(q.b, [round]), [{ v: round * (i + 2) }])
    } else {
      check(`${where} q_b`, await run(q.b, [`r${round}`, 'x']), [{ v: `r${round}-x-c${i}` }])
    }
    if (round % 10 === 0) {
      // An error on a named statement leaves it usable, on whichever server comes next.
      let failed = null
      try {
        await run(q.div, [0])
      } catch (err) {
        failed = err
      }
      if (failed === null || failed.code !== '22012') {
        throw new Error(`${where} q_div by 0: expected SQLSTATE 22012, got ${failed && failed.code}: ${failed}`)
      }
      check(`${where} q_div`, await run(q.div, [4]), [{ v: i * 25 }])
    }
  }

  // A committed transaction: one server throughout, own rows visible inside, kept after COMMIT.
  await client.query('BEGIN')
  const [first] = await run(q.pid, [])
  for (let n = 0; n < 10; n++) {
    await run(q.ins, [n])
    check(`client ${i} in transaction q_pid`, await run(q.pid, []), [first])
  }
  check(`client ${i} q_count inside the transaction`, await run(q.count, []), [{ n: 10 }])
  await client.query('COMMIT')
  backends.add(first.pid)
  check(`client ${i} q_count after COMMIT`, await run(q.count, []), [{ n: 10 }])

  // A rolled-back one: its rows are gone for everyone.
  await client.query('BEGIN')
  await run(q.ins, [99])
  check(`client ${i} q_count inside the rolled-back transaction`, await run(q.count, []), [{ n: 11 }])
  await client.query('ROLLBACK')
  check(`client ${i} q_count after ROLLBACK`, await run(q.count, []), [{ n: 10 }])
  return executions
}

async function main() {
  const timer = setTimeout(() => {
    console.error(`FAIL: not finished after ${DEADLINE_MS / 1000} s`)
    process.exit(1)
  }, DEADLINE_MS)
  timer.unref()

  const admin = new Client(config)
  await admin.connect()
  await admin.query(`CREATE TABLE ${table} (client int NOT NULL, n int NOT NULL)`)
  const clients = []
  try {
    for (let i = 0; i < CLIENTS; i++) {
      const client = new Client(config)
      clients.push(client)
    }
    await Promise.all(clients.map((c) => c.connect()))
    const backends = new Set()
    // allSettled: a failing client must not leave the others running past the exit.
    const outcomes = await Promise.allSettled(clients.map((c, i) => one(c, i, backends)))
    const failures = outcomes.filter((o) => o.status === 'rejected')
    if (failures.length > 0) {
      throw failures[0].reason
    }
    const total = outcomes.reduce((sum, o) => sum + o.value, 0)
    const rows = await admin.query(`SELECT count(*)::int AS n FROM ${table}`)
    check('rows committed by all clients', rows.rows, [{ n: CLIENTS * 10 }])
    console.log(
      `OK node-postgres ${require('pg/package.json').version}: ${CLIENTS} clients, ` +
        `${total} named-query executions, transactions committed and rolled back, ` +
        `backends=${backends.size}`,
    )
  } finally {
    await Promise.allSettled(clients.map((c) => c.end()))
    await admin.query(`DROP TABLE IF EXISTS ${table}`).catch(() => {})
    await admin.end()
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`FAIL: ${err && err.stack ? err.stack : err}`)
    process.exit(1)
  },
)
