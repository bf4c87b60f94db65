# How the pinned schema-3 database was made: run with a binary of schema 3 at
# /tmp/cosmopoints-v3 (built from commit c4255cc) as `python3 make.py DIR`, DIR holding
# config.toml. Kept as a record. Beside schema 2's content it has reversals (a partial
# and a full one of delivered transactions, one of a transaction without a partner, one
# of a failed delivery) and what the API showed for each transaction and its reversals.
import json, subprocess, time, urllib.request, urllib.parse, re, sys, os
d = sys.argv[1]
p = subprocess.Popen(["/tmp/cosmopoints-v3", "serve", "--config", os.path.join(d, "config.toml")], stderr=subprocess.PIPE, text=True)
addr = None
for line in p.stderr:
    m = re.search(r"listening on (\S+)", line)
    if m: addr = m.group(1); break
base = "http://" + addr
def call(method, path, body=None, token=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None)
    if body is not None: req.add_header("content-type", "application/json")
    if token: req.add_header("authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req) as r: return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e: return e.code, json.loads(e.read())
tok = {b: call("POST", "/v1/auth", {"clientId": c, "clientSecret": s})[1]["accessToken"] for b, c, s in [("acme","acme-pos","acme-secret"),("globex","globex-pos","globex-secret")]}
conns = [("acme", {"programId":"skywards","endUserId":"eu-1","destinationUserId":"EK100"}),
         ("acme", {"programId":"tiny","endUserId":"eu-1","destinationUserId":"T-1"}),
         ("globex", {"programId":"tiny","endUserId":"eu-1","destinationUserId":"G-77"})]
for b, body in conns:
  st, r = call("PUT", "/v1/program-connections", body, tok[b]); assert st == 201
items = [
  ("acme", {"programId":"skywards","value":3673,"userId":"EK100","referenceNumber":"inv-1"}),
  ("acme", {"programId":"skywards","value":100000,"endUserId":"eu-1","referenceNumber":"inv 2026/11#7","description":"Café crème ☕","bonus":True}),
  ("acme", {"programId":"skywards","value":5000,"userId":"invalid-9","referenceNumber":"rejected-1"}),
  ("acme", {"programId":"tiny","value":999,"endUserId":"eu-1","referenceNumber":"inv-3","description":""}),
  ("globex", {"programId":"tiny","value":5000,"userId":"G1","referenceNumber":"inv-1","description":"same reference, other business"}),
  ("globex", {"programId":"skywards","value":7000,"userId":"flaky-2","referenceNumber":"flaky-1"}),
]
for i in range(12):
  items.append(("acme", {"programId":"skywards" if i % 2 else "tiny","value":1000+i*37,"userId":"bulk-%d"%(i%3),"referenceNumber":"bulk-%02d"%i}))
for b, body in items:
  st, r = call("POST", "/v1/transactions", body, tok[b]); assert st == 201, (st, r)
# A batch, as schema 3 can write them.
st, r = call("POST", "/v1/transactions/batch", {"items": [
  {"programId":"tiny","value":2500,"userId":"batch-1","referenceNumber":"batch-1"},
  {"programId":"skywards","value":2500,"userId":"batch-2","referenceNumber":"batch-2"}]}, tok["globex"])
assert st == 200 and [x["status"] for x in r["results"]] == [201, 201], r
def settle():
  for _ in range(100):
    time.sleep(0.1)
    pend = 0
    for b in tok:
      st, lst = call("GET", "/v1/transactions?startDate=0000000000&endDate=9999999999&status=pending", None, tok[b])
      pend += len(lst)
    if pend == 0: return
  raise SystemExit("deliveries did not settle")
settle()
q = urllib.parse.quote
reversals = [
  ("acme", "inv-1", {"referenceNumber":"ret-1","value":1000,"reason":"one item returned"}),
  ("acme", "inv-1", {"referenceNumber":"ret-2","value":500}),
  ("acme", "inv 2026/11#7", {"referenceNumber":"ret-3"}),
  ("acme", "inv-3", {"referenceNumber":"ret-4","value":999}),
  ("globex", "batch-2", {"referenceNumber":"ret-1","value":100}),
]
for b, key, body in reversals:
  st, r = call("POST", "/v1/transactions/%s/reversals" % q(key, safe=""), body, tok[b]); assert st == 201, (st, r)
# A reversal of a transaction whose delivery failed (nothing to take back at the partner).
st, failed_reversal = call("POST", "/v1/transactions/rejected-1/reversals", {"referenceNumber":"ret-9"}, tok["acme"])
settle()
expected = {"transactions": {}, "by_id": {}, "reversals": {}, "connections": {}, "failed_reversal": [st, failed_reversal]}
for b in tok:
  st, lst = call("GET", "/v1/transactions?startDate=0000000000&endDate=9999999999", None, tok[b])
  expected["transactions"][b] = lst
  expected["by_id"][b] = {}
  expected["reversals"][b] = {}
  for tx in lst:
    st, one = call("GET", "/v1/transactions/" + tx["id"], None, tok[b]); assert st == 200
    expected["by_id"][b][tx["id"]] = one
    st, revs = call("GET", "/v1/transactions/%s/reversals" % tx["id"], None, tok[b]); assert st == 200
    expected["reversals"][b][tx["id"]] = revs
  st, c = call("GET", "/v1/program-connections?endUserId=eu-1", None, tok[b])
  expected["connections"][b] = c
p.terminate(); p.wait()
json.dump(expected, open(os.path.join(d, "expected.json"), "w"), indent=1, ensure_ascii=False)
print("ok", sum(len(v) for v in expected["transactions"].values()))
