// The Fastify peer of issue 14: Fastify 5 + better-sqlite3, one fsync per issue (WAL,
// synchronous = FULL), serving the two requests benches/peer.sh compares with Cosmopoints:
// POST /v1/transactions (an issue, idempotent on referenceNumber) and
// GET /v1/transactions/{referenceNumber}. A bearer token (HMAC-SHA256, as ours) is checked
// on both; the body is validated by Fastify's JSON schema; the answers have the same
// fields as Cosmopoints'. No access log (Fastify's logger is off), so the comparison
// leans the peer's way.
//
//   node server.js PORT DB_PATH   (prints "token T", then "listening on 127.0.0.1:PORT")
'use strict';
const crypto = require('node:crypto');
const Database = require('better-sqlite3');
// Strict bodies, as Cosmopoints': no type coercion, unknown fields rejected (Fastify's
// default would coerce types and drop unknown fields).
const fastify = require('fastify')({
  logger: false,
  ajv: { customOptions: { coerceTypes: false, removeAdditional: false } },
});

const [port, dbPath] = [Number(process.argv[2] || 0), process.argv[3] || ':memory:'];
const key = crypto.randomBytes(32);
const b64 = (buf) => Buffer.from(buf).toString('base64url');
const sign = (payload) => b64(crypto.createHmac('sha256', key).update(payload).digest());
const payload = b64(JSON.stringify({ business: 'demo-coffee', exp: Math.floor(Date.now() / 1000) + 86400 }));
const token = `${payload}.${sign(payload)}`;

// Verified tokens are kept (as Cosmopoints keeps them): an HMAC per request would cost the
// peer more than the rest of a GET.
const verified = new Map();
function caller(request) {
  const auth = request.headers.authorization || '';
  if (!auth.startsWith('Bearer ')) return null;
  const t = auth.slice(7);
  let claims = verified.get(t);
  if (claims === undefined) {
    const [p, s] = t.split('.');
    if (!p || !s) return null;
    const want = Buffer.from(sign(p));
    const got = Buffer.from(s);
    if (want.length !== got.length || !crypto.timingSafeEqual(want, got)) return null;
    claims = JSON.parse(Buffer.from(p, 'base64url').toString());
    if (verified.size >= 10000) verified.clear();
    verified.set(t, claims);
  }
  return claims.exp > Date.now() / 1000 ? claims.business : null;
}

const db = new Database(dbPath);
db.pragma('journal_mode = WAL');
db.pragma('synchronous = FULL'); // WAL: an fsync at every commit
db.exec(`CREATE TABLE IF NOT EXISTS transactions (
  seq INTEGER PRIMARY KEY, business TEXT NOT NULL, reference TEXT NOT NULL,
  program TEXT NOT NULL, user_id TEXT NOT NULL, description TEXT, value INTEGER NOT NULL,
  points INTEGER NOT NULL, bonus INTEGER NOT NULL, created_at TEXT NOT NULL,
  UNIQUE (business, reference))`);
const insert = db.prepare(`INSERT INTO transactions
  (business, reference, program, user_id, description, value, points, bonus, created_at)
  VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`);
const byReference = db.prepare('SELECT * FROM transactions WHERE business = ? AND reference = ?');
const programs = { skywards: { name: 'Skywards Miles', unitsPerPoint: 44 } };

const problem = (reply, status, title, detail) =>
  reply.code(status).type('application/problem+json').send({ type: 'about:blank', title, status, detail });
const id = (seq) => `tx_${b64(Buffer.from(seq.toString(16).padStart(32, '0'), 'hex'))}`;
const view = (row) => ({
  id: id(row.seq), referenceNumber: row.reference, sourceValue: row.value, currency: 'AED',
  description: row.description, createdAt: row.created_at, userId: row.user_id, endUserId: null,
  bonus: row.bonus === 1, totalPoints: row.points,
  pointTransactions: [{ destinationNumberOfPoints: String(row.points), type: 'base' }],
  partnership: { destination: { name: programs[row.program].name, programId: row.program } },
  status: 'completed', delivery: null, reversedValue: 0, reversedPoints: 0,
});

// Response schemas: Fastify then serialises with fast-json-stringify, its fast path.
const str = { type: 'string' };
const int = { type: 'integer' };
const summarySchema = {
  type: 'object',
  properties: { id: str, totalPoints: int, referenceNumber: str, date: str, status: str },
};
const transactionSchema = {
  type: 'object',
  properties: {
    id: str, referenceNumber: str, sourceValue: int, currency: str,
    description: { type: ['string', 'null'] }, createdAt: str, userId: str,
    endUserId: { type: 'null' }, bonus: { type: 'boolean' }, totalPoints: int,
    pointTransactions: {
      type: 'array',
      items: { type: 'object', properties: { destinationNumberOfPoints: str, type: str } },
    },
    partnership: {
      type: 'object',
      properties: {
        destination: { type: 'object', properties: { name: str, programId: str } },
      },
    },
    status: str, delivery: { type: 'null' }, reversedValue: int, reversedPoints: int,
  },
};

fastify.post('/v1/transactions', {
  schema: {
    response: { 200: summarySchema, 201: summarySchema },
    body: {
      type: 'object', additionalProperties: false,
      required: ['programId', 'value', 'userId', 'referenceNumber'],
      properties: {
        programId: { type: 'string', minLength: 1, maxLength: 64 },
        value: { type: 'integer', minimum: 1, maximum: 1000000000000 },
        userId: { type: 'string', minLength: 1, maxLength: 128 },
        referenceNumber: { type: 'string', minLength: 1, maxLength: 128 },
        description: { type: 'string', maxLength: 512 },
        bonus: { type: 'boolean' },
      },
    },
  },
}, (request, reply) => {
  const business = caller(request);
  if (!business) return problem(reply, 401, 'Unauthorized', 'a valid bearer token is required');
  const b = request.body;
  const program = programs[b.programId];
  if (!program) return problem(reply, 422, 'Unprocessable Entity', 'no such program');
  const points = Math.floor(b.value / program.unitsPerPoint);
  const date = new Date().toISOString().slice(0, 19) + 'Z';
  const description = b.description ?? null;
  const bonus = b.bonus ? 1 : 0;
  const done = insert.run(business, b.referenceNumber, b.programId, b.userId,
    description, b.value, points, bonus, date);
  if (done.changes === 1) {
    return reply.code(201).send({ id: id(Number(done.lastInsertRowid)), totalPoints: points,
      referenceNumber: b.referenceNumber, date, status: 'completed' });
  }
  // The referenceNumber was used: a replay if every field is the same, else a conflict.
  const row = byReference.get(business, b.referenceNumber);
  const same = row.program === b.programId && row.value === b.value && row.user_id === b.userId
    && row.description === description && row.bonus === bonus;
  if (!same) return problem(reply, 409, 'Conflict', 'referenceNumber used with other fields');
  return reply.code(200).send({ id: id(row.seq), totalPoints: row.points,
    referenceNumber: row.reference, date: row.created_at, status: 'completed' });
});

fastify.get('/v1/transactions/:key', {
  schema: { response: { 200: transactionSchema } },
}, (request, reply) => {
  const business = caller(request);
  if (!business) return problem(reply, 401, 'Unauthorized', 'a valid bearer token is required');
  const row = byReference.get(business, request.params.key);
  if (!row) return problem(reply, 404, 'Not Found', 'no such transaction');
  return reply.send(view(row));
});

console.log(`token ${token}`); // before the address: a caller that saw that has both
fastify.listen({ port, host: '127.0.0.1' }).then((address) => {
  console.log(`listening on ${address.replace('http://', '')}`);
});
