"""Manifest pieces shared by the Agent and gateway desired states."""

from __future__ import annotations

from typing import Any


def cpu_autoscaler(
    metadata: dict[str, Any], deployment: str, min_replicas: int, max_replicas: int, target_cpu_percent: int
) -> dict[str, Any]:
    """An autoscaling/v2 HPA scaling a Deployment on average CPU utilisation."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": target_cpu_percent},
                    },
                }
            ],
        },
    }
