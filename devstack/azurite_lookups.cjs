// Loaded into Azurite before it starts (node --require): lookups that do not slow down as the account fills up.
//
// Azurite keeps its metadata in LokiJS, which answers a query of several properties from the binary index of the
// first property only and filters the rest one record at a time. Azurite's queries name the account first, and every
// record of the local account shares it: each Get Messages, Delete Message, lease or blob read goes through every
// message, blob or block of the account. With 10,000 envelopes on the mail queue one receive-and-delete of a work item
// took 160 ms instead of 9 ms; a lease on a blob beside 20,000 others 41 ms instead of 7. Azure Storage's service has
// no such cost (docs/fidelity.md, "Storage latency and the account's size").
//
// Two changes, neither of which changes what a query finds or what a write stores:
// - a query's most selective indexed equality (a message id, a blob name, a queue name) goes to the front, where
//   LokiJS uses its index: the records an AND of conditions matches do not depend on their order;
// - a batch update or removal keeps the indexes up to date record by record, as a single one does, instead of
//   sorting every index again afterwards. Azurite removes a queue's expired messages before every Get Messages and
//   Delete Message, most often none, and each such empty removal sorted all four indexes of every message.
"use strict";

const path = require("path");

const azurite = path.dirname(require.resolve("azurite/package.json", { paths: [__dirname] }));
const loki = require(require.resolve("lokijs", { paths: [azurite] }));

const find = loki.Resultset.prototype.find;

// The value a condition compares equal to, or undefined when it is not an equality.
function equalTo(condition) {
  if (condition === null || typeof condition !== "object" || condition instanceof Date) {
    return { value: condition };
  }
  const operators = Object.keys(condition);
  return operators.length === 1 && operators[0] === "$eq" ? { value: condition.$eq } : undefined;
}

// How many records the index of `property` leaves to filter for `value`.
function matches(collection, property, value) {
  collection.ensureIndex(property);
  const [low, high] = collection.calculateRange("$eq", property, value);
  return high - low + 1;
}

loki.Resultset.prototype.find = function (query, firstOnly) {
  if (this.filterInitialized || !query || typeof query !== "object" || Array.isArray(query)) {
    return find.call(this, query, firstOnly);
  }
  const properties = Object.keys(query);
  if (properties.length < 2 || properties.some((p) => p.startsWith("$"))) {
    return find.call(this, query, firstOnly); // one condition, or operators such as $and and $loki: left as they are
  }
  let best;
  let fewest = Infinity;
  for (const property of properties) {
    const equal = equalTo(query[property]);
    if (equal !== undefined && this.collection.binaryIndices[property]) {
      const count = matches(this.collection, property, equal.value);
      if (count < fewest) {
        best = property;
        fewest = count;
      }
    }
  }
  if (best === undefined || best === properties[0]) {
    return find.call(this, query, firstOnly);
  }
  const reordered = { [best]: query[best] };
  for (const property of properties) {
    if (property !== best) {
      reordered[property] = query[property];
    }
  }
  return find.call(this, reordered, firstOnly);
};

// Up to this many records, a batch is written record by record, each keeping the indexes in place; more are written
// as LokiJS does, with one sort of each index afterwards.
const RECORD_BY_RECORD = 64;

const update = loki.Collection.prototype.update;
loki.Collection.prototype.update = function (doc) {
  if (!Array.isArray(doc) || doc.length > RECORD_BY_RECORD) {
    return update.call(this, doc);
  }
  for (const one of doc) {
    update.call(this, one);
  }
};

const removeBatch = loki.Collection.prototype.removeBatch;
loki.Collection.prototype.removeBatch = function (batch) {
  if (batch.length > RECORD_BY_RECORD || batch.some((one) => typeof one !== "object")) {
    return removeBatch.call(this, batch);
  }
  for (const one of batch) {
    this.remove(one);
  }
};
