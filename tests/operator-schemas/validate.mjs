// Validates Prometheus Operator objects against the operator's schemas, as packaged by
// @kubernetes-models/prometheus-operator (each class's validate()).
//
//   node validate.mjs NODE_MODULES < objects.json
//
// stdin: a JSON array of manifests. stdout: a JSON array with one entry per manifest,
// {"kind", "name", "errors": [...]}; an empty errors list means valid. A kind or apiVersion
// the package does not know is an error too, never a pass.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const KNOWN = new Set(["PodMonitor", "ServiceMonitor", "PrometheusRule", "Probe"]);
const manifests = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const manifest of manifests) {
  const kind = String(manifest.kind);
  const name = manifest.metadata?.name ?? "";
  const errors = [];
  if (manifest.apiVersion !== "monitoring.coreos.com/v1" || !KNOWN.has(kind)) {
    errors.push(`not a monitoring.coreos.com/v1 kind this checks: ${manifest.apiVersion} ${kind}`);
  } else {
    const path = join(
      modules,
      "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
      `${kind}.js`,
    );
    const module = await import(pathToFileURL(path).href);
    try {
      new module[kind](manifest).validate();
    } catch (error) {
      const details = (error.errors ?? []).map(
        (e) => `${e.instancePath || "/"}: ${e.message ?? e.keyword} ${JSON.stringify(e.params)}`,
      );
      errors.push(...(details.length ? details : [String(error.message ?? error)]));
    }
  }
  results.push({ kind, name, errors });
}
process.stdout.write(JSON.stringify(results));
