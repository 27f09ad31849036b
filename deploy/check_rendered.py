"""Checks on rendered kustomize output that a schema cannot make: references
between objects and the rules deploy/README.md promises. Called by
deploy/validate.sh as `python check_rendered.py NAME FILE` with the Python
that runs kubernetes-validate (it has PyYAML); prints one line per problem
and exits 1 if there is any.
"""

import sys
import tomllib

import yaml

CONFIG_KEY = "switchboard.toml"


def main(name, path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    problems = []

    def bad(obj, message):
        problems.append(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {message}")

    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    deployments = by_kind.get("Deployment", {})
    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})
    services = by_kind.get("Service", {})

    def pod_labels(deployment):
        return deployment["spec"]["template"]["metadata"].get("labels", {})

    def selects(selector, labels):
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    def secret_keys(secret):
        return set(secret.get("data", {}) or {}) | set(secret.get("stringData", {}) or {})

    switchboard = {}
    for dname, dep in deployments.items():
        spec = dep["spec"]["template"]["spec"]
        if not selects(dep["spec"]["selector"].get("matchLabels", {}), pod_labels(dep)):
            bad(dep, "selector does not match its pod labels")
        for vol in spec.get("volumes", []):
            cm = vol.get("configMap")
            if cm and cm["name"] not in configmaps and not cm.get("optional"):
                bad(dep, f"volume {vol['name']}: no ConfigMap {cm['name']}")
        if spec.get("automountServiceAccountToken") is not False:
            bad(dep, "automountServiceAccountToken must be false")
        pod_sc = spec.get("securityContext", {})
        for c in spec["containers"]:
            sc = {**pod_sc, **c.get("securityContext", {})}
            if not sc.get("runAsNonRoot"):
                bad(dep, f"container {c['name']}: runAsNonRoot must be true")
            if not sc.get("readOnlyRootFilesystem"):
                bad(dep, f"container {c['name']}: readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad(dep, f"container {c['name']}: allowPrivilegeEscalation must be false")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        bad(dep, f"container {c['name']}: no {kind}.{r}")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if not ref or ref.get("optional"):
                    continue
                secret = secrets.get(ref["name"])
                if secret is None:
                    bad(dep, f"env {env['name']}: no Secret {ref['name']}")
                elif ref["key"] not in secret_keys(secret):
                    bad(dep, f"env {env['name']}: Secret {ref['name']} has no key {ref['key']}")
            if c.get("args", [None])[0] in ("serve", "worker"):
                switchboard[dname] = (dep, c)

    hubs = {n: v for n, v in switchboard.items() if v[1]["args"][0] == "serve"}
    workers = {n: v for n, v in switchboard.items() if v[1]["args"][0] == "worker"}
    if not hubs:
        problems.append(f"{name}: no Deployment runs `switchboard serve`")

    for dname, (dep, c) in switchboard.items():
        spec = dep["spec"]["template"]["spec"]
        args = c["args"]
        path = args[args.index("--config") + 1] if "--config" in args else None
        mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
        toml_text = None
        for vol in spec.get("volumes", []):
            cm = vol.get("configMap")
            if cm and vol["name"] in mounts and cm["name"] in configmaps:
                if path == f"{mounts[vol['name']].rstrip('/')}/{CONFIG_KEY}":
                    toml_text = configmaps[cm["name"]].get("data", {}).get(CONFIG_KEY)
        if toml_text is None:
            bad(dep, f"--config {path} is not {CONFIG_KEY} of a mounted ConfigMap")
            continue
        config = tomllib.loads(toml_text)
        env = {e["name"]: e.get("value") for e in c.get("env", [])}

        def effective(section, key, default=None):
            name = f"SWITCHBOARD__{section.upper()}__{key.upper()}"
            if env.get(name) is not None:
                return env[name]
            return config.get(section, {}).get(key, default)

        port = int(effective("server", "port", 8000))
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        if ports.get("http") != port:
            bad(dep, f"containerPort http {ports.get('http')} is not server.port {port}")
        for probe, want in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
            got = c.get(probe, {}).get("httpGet", {}).get("path")
            if got != want:
                bad(dep, f"{probe} path {got!r}, want {want!r}")
        if effective("broker", "kind") != "redis":
            bad(dep, "broker.kind must be \"redis\" (many pods share Redis)")
        if effective("server", "instance_id", "") != "":
            bad(dep, "server.instance_id must be empty (every pod a new instance)")
        grace = int(effective("server", "shutdown_grace_s", 10))
        pre_stop = 0
        cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        if len(cmd) == 2 and cmd[0] == "sleep":
            pre_stop = int(cmd[1])
        termination = spec.get("terminationGracePeriodSeconds", 30)
        if termination <= pre_stop + grace:
            bad(dep, f"terminationGracePeriodSeconds {termination} <= preStop {pre_stop} + server.shutdown_grace_s {grace}")
        if dname in hubs:
            if pre_stop < 1:
                bad(dep, "hub pods need a preStop pause (exec sleep N) so load balancers drain first")
            if effective("server", "static_dir", "web") != "":
                bad(dep, "server.static_dir must be empty")
            if workers and int(effective("tasks", "workers", 4)) != 0:
                bad(dep, "tasks.workers must be 0 when a worker Deployment runs the tasks")
            if not any(selects(s["spec"].get("selector", {}), pod_labels(dep)) for s in services.values()):
                bad(dep, "no Service selects the hub pods")
        url = str(effective("redis", "url", ""))
        host = url.split("://", 1)[-1].split("@")[-1].split(":")[0].split("/")[0]
        redis_from_secret = any(
            e["name"] == "SWITCHBOARD__REDIS__URL" and "valueFrom" in e
            and e["valueFrom"]["secretKeyRef"]["key"] in secret_keys(secrets.get(e["valueFrom"]["secretKeyRef"]["name"], {}))
            for e in c.get("env", [])
        )
        if name != "base" and "." not in host and host not in services and not redis_from_secret:
            bad(dep, f"redis.url host {host!r} is no Service here and the Secret has no redis_url")

    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        target = hpa["spec"]["scaleTargetRef"]
        if target["name"] not in deployments:
            bad(hpa, f"scaleTargetRef {target['name']} is no Deployment here")
        elif deployments[target["name"]]["spec"].get("replicas") is not None:
            bad(hpa, f"Deployment {target['name']} sets replicas: every apply would undo the autoscaler")
    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        sel = pdb["spec"]["selector"].get("matchLabels", {})
        if not any(selects(sel, pod_labels(d)) for d in deployments.values()):
            bad(pdb, "selects no Deployment's pods")
    for svc in services.values():
        if not any(selects(svc["spec"].get("selector", {}), pod_labels(d)) for d in deployments.values()):
            bad(svc, "selects no Deployment's pods")

    for p in problems:
        print(f"ERROR {p}")
    if not problems:
        print(f"{name}: references, probes, security context, grace periods: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
