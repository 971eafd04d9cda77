"""One lock for the forward-mode AD regions (``torch.func.jvp``).

Forward-mode AD levels are process-wide in torch: two threads that enter ``torch.func.jvp`` at
once share one level counter, and one fails with "Trying to create a dual Tensor for forward AD
but no level exists" (two optimizers tuned in parallel, as Optuna's ``n_jobs=2`` runs them). The
regions are short (a tangent update), so serialising them costs little; everything else in a
step runs in parallel.
"""

from __future__ import annotations

import threading

__all__ = ["FORWARD_AD_LOCK"]

FORWARD_AD_LOCK = threading.RLock()
