"""The plan's step-0 audit (implementation_plan_v4.md, `audit_data()`), kept as the baseline.

Adapted only to the real data: folders are arguments, the checkpoint glob is the real name
(`checkpoint_L*.json` instead of `comprehensive_patching_checkpoint_*.json`) and the
expected conditions are the six real ones (the plan listed two `*_amplification`
conditions that never existed). Everything else is the plan's algorithm: stdlib
`json.load` per file, Python loops, return at the first error, and causal features counted
by summing every checkpoint file (wrong: checkpoints are cumulative).

    python benchmarks/plan_audit.py CHECKPOINT_DIR RESPONSE_DIR [OUT.json]
"""

import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)
logging.basicConfig(level=logging.INFO)

REAL_CONDITIONS = [
    "safe_baseline", "safe_with_safe_patch", "safe_with_risky_patch",
    "risky_baseline", "risky_with_safe_patch", "risky_with_risky_patch",
]


def audit_data(checkpoint_dir, response_dir):
    """
    COMPLETE data validation - checks ALL files
    """
    audit_results = {
        'errors': [],
        'warnings': [],
        'validated': False
    }

    # 1. Load all checkpoints
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_files = list(checkpoint_dir.glob("checkpoint_L*.json"))

    if not checkpoint_files:
        audit_results['errors'].append("No checkpoint files found")
        return audit_results

    logger.info(f"Found {len(checkpoint_files)} checkpoint files")

    checkpoints = []
    for file in tqdm(checkpoint_files, desc="Loading checkpoints"):
        try:
            with open(file, 'r') as f:
                data = json.load(f)
                checkpoints.append(data)
        except Exception as e:
            audit_results['errors'].append(f"Failed to load {file}: {e}")
            return audit_results

    # 2. Verify schema for ALL results
    required_fields = ['feature', 'layer', 'feature_id', 'is_causal', 'cohen_d']

    for checkpoint in checkpoints:
        for result in checkpoint.get('results', []):
            missing_fields = [f for f in required_fields if f not in result]
            if missing_fields:
                audit_results['errors'].append(
                    f"Missing fields in {result.get('feature', 'unknown')}: {missing_fields}"
                )
                return audit_results

    logger.info("✓ Schema validation passed (all checkpoints)")

    # 3. Count causal features per layer
    causal_by_layer = defaultdict(int)
    all_causal_features = []

    for checkpoint in checkpoints:
        for result in checkpoint.get('results', []):
            if result.get('is_causal'):
                layer = result['layer']
                causal_by_layer[layer] += 1
                all_causal_features.append(result['feature'])

    logger.info(f"Causal features by layer: {dict(causal_by_layer)}")
    logger.info(f"Total causal features: {len(all_causal_features)}")

    # 4. Verify response logs - CHECK ALL FILES
    response_dir = Path(response_dir)
    response_files = list(response_dir.glob("*.json"))

    if not response_files:
        audit_results['errors'].append("No response log files found")
        return audit_results

    logger.info(f"Found {len(response_files)} response log files")

    # Check trial counts per feature - PROCESS ALL FILES
    feature_trial_counts = defaultdict(lambda: defaultdict(int))
    response_features = set()
    total_trials = 0

    for file in tqdm(response_files, desc="Validating response logs"):
        try:
            with open(file, 'r') as f:
                responses = json.load(f)
        except Exception as e:
            audit_results['errors'].append(f"Failed to load {file}: {e}")
            return audit_results

        for response in responses:
            total_trials += 1

            # Check required fields in response
            if 'feature' not in response:
                audit_results['errors'].append(f"Response missing 'feature' field in {file}")
                return audit_results

            if 'condition' not in response:
                audit_results['errors'].append(f"Response missing 'condition' field in {file}")
                return audit_results

            if 'response' not in response or not response['response']:
                audit_results['errors'].append(
                    f"Response missing text payload: {response.get('feature', 'unknown')}"
                )
                return audit_results

            # Count trials per condition
            feature = response['feature']
            condition = response['condition']
            feature_trial_counts[feature][condition] += 1
            response_features.add(feature)

    logger.info(f"✓ Total trials validated: {total_trials:,}")
    logger.info(f"✓ Total features in response logs: {len(response_features)}")

    # Check if all 6 conditions present for ALL features
    expected_conditions = REAL_CONDITIONS

    missing_condition_count = 0
    low_trial_count = 0

    for feature, condition_counts in feature_trial_counts.items():
        missing_conditions = [c for c in expected_conditions if c not in condition_counts]
        if missing_conditions:
            missing_condition_count += 1
            if missing_condition_count <= 10:  # Only log first 10
                audit_results['warnings'].append(
                    f"{feature} missing conditions: {missing_conditions}"
                )

        # Check trial counts
        for condition, count in condition_counts.items():
            if count < 20:  # Warning if < 20 trials
                low_trial_count += 1
                if low_trial_count <= 10:  # Only log first 10
                    audit_results['warnings'].append(
                        f"{feature} {condition} has only {count} trials (expected ~30)"
                    )

    if missing_condition_count > 0:
        logger.warning(f"⚠ {missing_condition_count} features missing some conditions")
    if low_trial_count > 0:
        logger.warning(f"⚠ {low_trial_count} feature-conditions with <20 trials")

    logger.info("✓ Response log validation passed")

    # 5. Test join: Can we link checkpoint features to response logs?
    checkpoint_features = set(all_causal_features)
    intersection = checkpoint_features & response_features

    logger.info(f"Causal features in checkpoints: {len(checkpoint_features)}")
    logger.info(f"Features in response logs: {len(response_features)}")
    logger.info(f"Joinable features: {len(intersection)}")

    join_rate = len(intersection) / len(checkpoint_features) * 100 if checkpoint_features else 0
    logger.info(f"Join rate: {join_rate:.1f}%")

    if join_rate < 90:
        audit_results['warnings'].append(
            f"Low join rate: {join_rate:.1f}% (expected >90%)"
        )

    # Success criteria
    if len(audit_results['errors']) == 0:
        audit_results['validated'] = True
        logger.info("✅ Data audit PASSED - ALL files validated")
    else:
        logger.error(f"❌ Data audit FAILED: {len(audit_results['errors'])} errors")

    if audit_results['warnings']:
        logger.warning(f"⚠️  {len(audit_results['warnings'])} warnings (non-blocking)")

    return {
        'causal_by_layer': dict(causal_by_layer),
        'total_causal_features': len(all_causal_features),
        'total_response_features': len(response_features),
        'joinable_features': len(intersection),
        'join_rate_percent': join_rate,
        'total_trials': total_trials,
        'audit_results': audit_results,
        'validated': audit_results['validated']
    }


if __name__ == "__main__":
    result = audit_data(sys.argv[1], sys.argv[2])
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text(json.dumps(result, indent=1, default=str))
