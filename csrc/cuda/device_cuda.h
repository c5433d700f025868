#pragma once

namespace rext::cuda {

// Number of visible CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

}  // namespace rext::cuda
