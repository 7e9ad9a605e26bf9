// The step profiler: Kineto's CPU events of the profiled steps, nested per thread, each event's
// self time charged to a region (see profile.h).
#include "train/profile.h"

#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <map>
#include <sstream>
#include <unordered_map>

#include "train/file_write.h"

namespace gbmoe {

namespace {

namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

const std::string kRegionPrefix = "gbmoe::";
const std::string kBackwardPrefix = "autograd::engine::evaluate_function: ";

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Event {
  uint64_t start, end;
  std::string name;
  int64_t sequence_nr;
};

// "X (backward)" for a backward node no forward op names (a custom autograd function, whose
// forward runs no recorded op of its sequence number): X is the function's own name.
std::string node_name(const std::string& event) {
  std::string name = event.substr(kBackwardPrefix.size());
  const auto open = name.rfind("::");
  if (open != std::string::npos) name = name.substr(open + 2);
  if (!name.empty() && name.back() == '>') name.pop_back();
  return name + " (backward)";
}

std::vector<ProfileSummary::Row> sorted_rows(const std::map<std::string, double>& seconds) {
  std::vector<ProfileSummary::Row> rows;
  for (const auto& [name, s] : seconds) rows.push_back({name, s});
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) {
    return a.seconds != b.seconds ? a.seconds > b.seconds : a.name < b.name;
  });
  return rows;
}

// Nests one thread's events by time (a parent starts no later and ends no earlier than its
// children) and charges each event's self time to its region: the innermost gbmoe:: scope; for a
// backward node's work, the region of the forward op with the node's sequence number.
void summarize(std::vector<Event> events, ProfileSummary& out) {
  std::sort(events.begin(), events.end(), [](const Event& a, const Event& b) {
    return a.start != b.start ? a.start < b.start : a.end > b.end;
  });
  struct Open {
    size_t index;
    std::string region;
    bool backward;
    uint64_t children_ns = 0;
  };
  std::vector<Open> stack;
  std::unordered_map<int64_t, std::string> forward_region;  // sequence number -> region
  std::map<std::string, double> regions, ops;
  auto close = [&](const Open& o) {
    const auto& e = events[o.index];
    const uint64_t total = e.end - e.start;
    const double self = 1e-9 * static_cast<double>(total - std::min(total, o.children_ns));
    regions[o.region] += self;
    if (e.name.rfind(kRegionPrefix, 0) != 0) {
      ops[e.name.rfind(kBackwardPrefix, 0) == 0 ? "autograd engine (node wrapper)" : e.name] +=
          self;
    }
  };
  for (size_t i = 0; i < events.size(); ++i) {
    const auto& e = events[i];
    while (!stack.empty() && events[stack.back().index].end <= e.start) {
      close(stack.back());
      stack.pop_back();
    }
    if (!stack.empty()) stack.back().children_ns += e.end - e.start;
    Open o{i, stack.empty() ? "between steps (evaluation, checkpoints, logs)" : stack.back().region,
           !stack.empty() && stack.back().backward};
    if (e.name.rfind(kRegionPrefix, 0) == 0) {
      o.region = e.name.substr(kRegionPrefix.size());
    } else if (e.name.rfind(kBackwardPrefix, 0) == 0) {
      o.backward = true;
      const auto found = forward_region.find(e.sequence_nr);
      o.region = e.name.find("AccumulateGrad") != std::string::npos ? "gradient accumulation"
                 : found != forward_region.end()                    ? found->second + " (backward)"
                                                                    : node_name(e.name);
    } else if (!o.backward && e.sequence_nr >= 0) {
      // Ops that make no node read the number too; the last one to read it made the node.
      forward_region[e.sequence_nr] = o.region;
    }
    stack.push_back(o);
  }
  for (; !stack.empty(); stack.pop_back()) close(stack.back());
  out.regions = sorted_rows(regions);
  out.ops = sorted_rows(ops);
}

}  // namespace

StepProfiler::StepProfiler(std::string dir, int64_t rank, int64_t first_step, int64_t num_steps)
    : dir_(std::move(dir)), rank_(rank), first_step_(first_step), num_steps_(num_steps) {}

StepProfiler::~StepProfiler() {
  if (running_) prof::disableProfiler();
}

void StepProfiler::before_step(int64_t step) {
  if (num_steps_ <= 0 || step != first_step_ || running_) return;
  const ProfilerConfig config(ProfilerState::KINETO);
  const std::set<ActivityType> activities{ActivityType::CPU};
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  running_ = true;
  started_ = now_seconds();
}

bool StepProfiler::after_step(int64_t step) {
  if (!running_ || step != first_step_ + num_steps_ - 1) return false;
  summary_.step_seconds = now_seconds() - started_;
  summary_.steps = num_steps_;
  auto result = prof::disableProfiler();
  running_ = false;
  // The thread that ran the steps: the one with the gbmoe::step regions.
  std::map<uint64_t, std::vector<Event>> by_thread;
  std::map<uint64_t, int64_t> step_regions;
  for (const auto& k : result->events()) {
    if (k.deviceType() != c10::DeviceType::CPU || k.endNs() <= k.startNs()) continue;
    by_thread[k.startThreadId()].push_back({k.startNs(), k.endNs(), k.name(), k.sequenceNr()});
    if (k.name() == kRegionPrefix + "step") ++step_regions[k.startThreadId()];
  }
  uint64_t thread = 0;
  int64_t most = -1;
  for (const auto& [t, n] : step_regions) {
    if (n > most) thread = t, most = n;
  }
  summarize(std::move(by_thread[thread]), summary_);
  std::filesystem::create_directories(dir_);
  const std::string base = dir_ + "/rank" + std::to_string(rank_);
  write_text(base + ".txt", format(summary_));
  result->save(base + ".trace.json");
  return true;
}

std::string StepProfiler::format(const ProfileSummary& s) {
  std::ostringstream o;
  const double per_step = s.step_seconds / std::max<int64_t>(1, s.steps);
  double charged = 0;
  for (const auto& r : s.regions) charged += r.seconds;
  o << std::fixed << std::setprecision(2) << "profile of " << s.steps
    << " steps: " << 1e3 * per_step << " ms per step (profiler on), " << 1e3 * charged / s.steps
    << " ms of it in profiled events\n\n";
  auto table = [&](const char* title, const std::vector<ProfileSummary::Row>& rows, size_t most) {
    o << std::left << std::setw(48) << title << std::right << std::setw(12) << "ms/step"
      << std::setw(9) << "share\n";
    for (size_t i = 0; i < rows.size() && i < most; ++i) {
      o << std::left << std::setw(48) << rows[i].name << std::right << std::setw(12)
        << 1e3 * rows[i].seconds / s.steps << std::setw(7) << 100 * rows[i].seconds / charged
        << " %\n";
    }
    o << "\n";
  };
  table("region (self time)", s.regions, s.regions.size());
  table("op (self time)", s.ops, 25);
  return o.str();
}

}  // namespace gbmoe
