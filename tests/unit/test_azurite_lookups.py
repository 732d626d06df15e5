"""devstack/azurite_lookups.cjs, loaded into Azurite: on the LokiJS that Azurite uses, a query finds the same records
as without it, reading only the records of its most selective index; batch updates and removals keep every index
valid without sorting it again. Run with node on the real LokiJS, against the functions it replaces."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRELOAD = ROOT / "devstack" / "azurite_lookups.cjs"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (ROOT / "devstack" / "node_modules" / "lokijs").is_dir(),
    reason="needs node and devstack's node packages (bash scripts/setup.sh)",
)

# The original functions are kept before the preload replaces them, so that each check runs both.
SCRIPT = r"""
const path = require("path");
const preload = process.argv[1];
const azurite = path.dirname(require.resolve("azurite/package.json", { paths: [path.dirname(preload)] }));
const loki = require(require.resolve("lokijs", { paths: [azurite] }));
const original = {
  find: loki.Resultset.prototype.find,
  update: loki.Collection.prototype.update,
  removeBatch: loki.Collection.prototype.removeBatch,
};
require(preload);
const patched = {
  find: loki.Resultset.prototype.find,
  update: loki.Collection.prototype.update,
  removeBatch: loki.Collection.prototype.removeBatch,
};
function use(which) {
  loki.Resultset.prototype.find = which.find;
  loki.Collection.prototype.update = which.update;
  loki.Collection.prototype.removeBatch = which.removeBatch;
}

let seed = 7;
function random(n) {
  seed = (seed * 1103515245 + 12345) % 2147483648;
  return Math.floor(seed / 65536) % n;
}

// As Azurite's blob metadata: one account, a few containers, many names, snapshots.
function blobs(count) {
  const db = new loki("test.db", { persistenceMethod: "memory" });
  const coll = db.addCollection("blobs", { indices: ["accountName", "containerName", "name", "snapshot"] });
  for (let i = 0; i < count; i++) {
    coll.insert({
      accountName: "devstoreaccount1",
      containerName: "c" + random(3),
      name: "b" + random(count / 4),
      snapshot: random(5) === 0 ? "2026-01-0" + random(9) : "",
      size: random(1000),
    });
  }
  return coll;
}

const out = {};

// 1. The same records, for every kind of query Azurite makes and more.
{
  const coll = blobs(4000);
  const queries = [];
  for (let i = 0; i < 400; i++) {
    const q = {};
    const fields = [
      ["accountName", () => (random(10) ? "devstoreaccount1" : "other")],
      ["containerName", () => "c" + random(4)],
      ["name", () => "b" + random(1100)],
      ["snapshot", () => (random(2) ? "" : { $eq: "" })],
      ["size", () => ({ $lte: random(1000) })],
    ];
    for (const [field, value] of fields) {
      if (random(3)) q[field] = value();
    }
    queries.push(q);
  }
  queries.push({ accountName: "devstoreaccount1", $loki: { $gt: 100 } }, { name: "b1" }, {});
  let differing = 0;
  let nonEmpty = 0;
  for (const q of queries) {
    use(original);
    const before = coll.chain().find(q).data().map((d) => d.$loki).sort((a, b) => a - b);
    const countBefore = coll.count(q);
    use(patched);
    const after = coll.chain().find(q).data().map((d) => d.$loki).sort((a, b) => a - b);
    if (JSON.stringify(before) !== JSON.stringify(after) || countBefore !== coll.count(q)) differing++;
    if (before.length) nonEmpty++;
  }
  out.queries = queries.length;
  out.differing = differing;
  out.nonEmpty = nonEmpty;
}

// 2. Records read to find one blob by account, container and name: every record before, a handful after.
{
  const coll = blobs(4000);
  const target = coll.data[1234];
  const q = { accountName: target.accountName, containerName: target.containerName, name: target.name, snapshot: "" };
  const counted = {};
  for (const [label, which] of [["original", original], ["patched", patched]]) {
    use(which);
    let reads = 0;
    const eq = loki.LokiOps.$eq;
    loki.LokiOps.$eq = (a, b) => { reads++; return eq(a, b); };
    const found = coll.findOne(q);
    loki.LokiOps.$eq = eq;
    counted[label] = { reads, found: found && found.$loki };
  }
  out.reads = counted;
}

// 3. Batch writes: no index sorted again, every index still valid, the same records stored.
{
  const sorts = {};
  const valid = {};
  const stored = {};
  for (const [label, which] of [["original", original], ["patched", patched]]) {
    use(which);
    seed = 11;
    const coll = blobs(2000);
    let rebuilt = 0;
    const ensure = coll.ensureIndex;
    coll.ensureIndex = function (property, force) {
      if (force || (this.binaryIndices[property] && this.binaryIndices[property].dirty)) rebuilt++;
      return ensure.call(this, property, force);
    };
    coll.remove([]);
    // Records picked by id: LokiJS's order of a query's results among equal index values is not kept by a sort.
    const some = [5, 17, 400].map((id) => coll.get(id));
    for (const d of some) d.name = "renamed" + d.$loki;
    coll.update(some);
    coll.remove([coll.get(10)]);
    coll.remove([coll.get(20), coll.get(1999)]);
    sorts[label] = rebuilt;
    valid[label] = ["accountName", "containerName", "name", "snapshot"].every((p) => coll.checkIndex(p));
    stored[label] = coll.data.map((d) => d.$loki + ":" + d.name).join(",");
  }
  out.sorts = sorts;
  out.valid = valid;
  out.sameRecords = stored.original === stored.patched;
}

process.stdout.write(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def result() -> dict[str, object]:
    run = subprocess.run(
        ["node", "-e", SCRIPT, str(PRELOAD)], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    outcome: dict[str, object] = json.loads(run.stdout)
    return outcome


def test_queries_find_the_same_records(result: dict[str, object]) -> None:
    assert result["differing"] == 0
    # The comparison means something: most queries found records, not only nothing.
    assert isinstance(result["nonEmpty"], int) and result["nonEmpty"] > 100


def test_a_lookup_reads_only_its_index_range(result: dict[str, object]) -> None:
    reads = result["reads"]
    assert isinstance(reads, dict)
    assert reads["patched"]["found"] == reads["original"]["found"] is not None
    assert reads["original"]["reads"] >= 4000  # the control: the account's index gives every record
    assert reads["patched"]["reads"] * 100 < reads["original"]["reads"]


def test_batch_writes_keep_indexes_valid_without_sorting(result: dict[str, object]) -> None:
    sorts, valid = result["sorts"], result["valid"]
    assert isinstance(sorts, dict) and isinstance(valid, dict)
    assert sorts["original"] > 0  # the control: a batch sorts every index again
    assert sorts["patched"] == 0
    assert valid == {"original": True, "patched": True}
    assert result["sameRecords"] is True
