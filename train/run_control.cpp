// Stop signals (sigaction; the first wakes the on_stop thread, the second takes the default
// action) and the non-finite-step rule of the training loop.
#include "train/run_control.h"

#include <semaphore.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <sstream>

#include "parallel/runtime.h"
#include "train/checkpoint.h"

namespace gbmoe {
namespace {

constexpr int kStopSignals[] = {SIGTERM, SIGINT, SIGUSR1};
volatile std::sig_atomic_t g_stop_requested = 0;
// Posted by the first stop (sem_post is async-signal-safe); StopSignals' thread waits on it.
sem_t g_stop_posted;
volatile std::sig_atomic_t g_stop_posted_ready = 0;
struct sigaction g_previous[std::size(kStopSignals)];

void post_stop() {
  if (g_stop_requested) return;
  g_stop_requested = 1;
  if (g_stop_posted_ready) sem_post(&g_stop_posted);
}

void on_stop_signal(int sig) {
  if (g_stop_requested) {  // the second signal: stop at once
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  post_stop();
  const char text[] =
      "gbmoe-train: stop signal: checkpointing now and after this step; a second signal stops at "
      "once\n";
  [[maybe_unused]] const ssize_t n = ::write(STDERR_FILENO, text, sizeof(text) - 1);
}

}  // namespace

StopSignals::StopSignals(std::function<void()> on_stop) : on_stop_(std::move(on_stop)) {
  g_stop_requested = 0;
  if (on_stop_) {
    sem_init(&g_stop_posted, 0, 0);
    g_stop_posted_ready = 1;
    thread_ = std::thread([this] {
      while (sem_wait(&g_stop_posted) != 0 && errno == EINTR) {
      }
      if (g_stop_requested) on_stop_();  // else the destructor woke it
    });
  }
  struct sigaction action;
  std::memset(&action, 0, sizeof(action));
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  for (size_t i = 0; i < std::size(kStopSignals); ++i) {
    sigaction(kStopSignals[i], &action, &g_previous[i]);
  }
}

StopSignals::~StopSignals() {
  for (size_t i = 0; i < std::size(kStopSignals); ++i) {
    sigaction(kStopSignals[i], &g_previous[i], nullptr);
  }
  if (!thread_.joinable()) return;
  g_stop_posted_ready = 0;
  sem_post(&g_stop_posted);
  thread_.join();
  sem_destroy(&g_stop_posted);
}

bool stop_requested() { return g_stop_requested != 0; }

void request_stop() { post_stop(); }

NonFiniteSteps::NonFiniteSteps(int64_t max_skipped, std::string run_dir)
    : max_skipped_(max_skipped), run_dir_(std::move(run_dir)) {}

bool NonFiniteSteps::accept_loss(int64_t step, bool finite_everywhere, const std::string& term) {
  return finite_everywhere || accept(step, "non-finite loss (" + term + ")");
}

bool NonFiniteSteps::accept_grad_norm(int64_t step, double grad_norm, Communicator& world) {
  auto bad = torch::tensor({std::isfinite(grad_norm) ? 0.0 : 1.0}, torch::kDouble);
  world.all_reduce(bad, ReduceOp::Max);
  if (bad.item<double>() == 0.0) return true;
  std::ostringstream what;
  what << "non-finite gradient norm (" << grad_norm
       << (std::isfinite(grad_norm) ? " here, not finite on another rank" : "") << ")";
  return accept(step, what.str());
}

bool NonFiniteSteps::accept(int64_t step, const std::string& what) {
  if (skipped_ < max_skipped_) {
    ++skipped_;
    log0("step ", step, ": ", what, ": skipped, not applied (", skipped_, " of at most ",
         max_skipped_, ", train.max_nonfinite_steps)");
    return false;
  }
  const auto checkpoints = list_checkpoints(run_dir_);
  std::ostringstream m;
  m << "step " << step << ": " << what << "; the step was not applied and the run stops";
  if (max_skipped_ > 0) m << " after skipping " << skipped_ << " (train.max_nonfinite_steps)";
  m << ". ";
  if (checkpoints.empty()) {
    m << "No checkpoint was written yet";
  } else {
    m << "The last checkpoint " << checkpoints.back()
      << " holds no non-finite state: resume from it with --set train.resume=auto";
  }
  m << "; lower optim.lr or raise optim.warmup_steps";
  if (max_skipped_ == 0) m << ", or skip such steps with train.max_nonfinite_steps";
  throw JobStopped(m.str());
}

}  // namespace gbmoe
