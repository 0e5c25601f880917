// Validates the cert-manager and Prometheus Operator objects of a rendered
// overlay against those projects' CRD schemas, as compiled into the
// @kubernetes-models packages (scripts/setup installs them; the bundled
// Kubernetes schemas of kubernetes-validate do not have these kinds).
//
// Usage: node tests/k8s-crds.mjs MODELS_DIR < objects.json
// Reads a JSON array of objects; prints one line per object checked and
// exits 1 when one does not validate, or names a kind of those groups that
// no model covers.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const models = process.argv[2];
const kinds = {
  "cert-manager.io/v1": ["@kubernetes-models/cert-manager", "cert-manager.io/v1", ["Certificate", "Issuer", "ClusterIssuer"]],
  "monitoring.coreos.com/v1": ["@kubernetes-models/prometheus-operator", "monitoring.coreos.com/v1", ["ServiceMonitor", "PodMonitor", "PrometheusRule"]],
};
const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const o of objects) {
  const group = (o.apiVersion || "").split("/")[0];
  if (!["cert-manager.io", "monitoring.coreos.com"].includes(group)) continue;
  const name = `${o.kind} ${o.metadata?.name}`;
  const known = kinds[o.apiVersion];
  if (!known || !known[2].includes(o.kind)) {
    console.log(`FAIL ${name}: no schema for ${o.apiVersion} ${o.kind}`);
    failed = true;
    continue;
  }
  const file = join(models, "node_modules", known[0], known[1], `${o.kind}.js`);
  const Model = (await import(pathToFileURL(file)))[o.kind];
  try {
    new Model(o).validate();
    console.log(`ok ${o.apiVersion} ${name}`);
  } catch (e) {
    console.log(`FAIL ${name}: ${e.message}`);
    failed = true;
  }
}
process.exit(failed ? 1 : 0);
