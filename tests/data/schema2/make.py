# How the pinned schema-2 database was made: run with the 0.2.0 binary at /tmp/cosmopoints-v2
# (built from commit 282e017) as `python3 make.py DIR`, DIR holding config.toml. Kept as a record.
import json, subprocess, time, urllib.request, re, sys, os
d = sys.argv[1]
p = subprocess.Popen(["/tmp/cosmopoints-v2", "serve", "--config", os.path.join(d, "config.toml")], stderr=subprocess.PIPE, text=True)
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
issued = []
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
  issued.append((b, r["id"]))
# Let every delivery settle (flaky members fail twice, one second apart).
for _ in range(100):
  time.sleep(0.1)
  pend = 0
  for b in tok:
    st, lst = call("GET", "/v1/transactions?startDate=0000000000&endDate=9999999999&status=pending", None, tok[b])
    pend += len(lst)
  if pend == 0: break
assert pend == 0
expected = {"transactions": {}, "connections": {}}
for b in tok:
  st, lst = call("GET", "/v1/transactions?startDate=0000000000&endDate=9999999999", None, tok[b])
  expected["transactions"][b] = lst
  st, c = call("GET", "/v1/program-connections?endUserId=eu-1", None, tok[b])
  expected["connections"][b] = c
p.terminate(); p.wait()
json.dump(expected, open(os.path.join(d, "expected.json"), "w"), indent=1, ensure_ascii=False)
print("ok", len(issued))
