// Stop signals: the first SIGTERM, SIGINT or SIGUSR1 only asks for a stop and runs on_stop at
// once on a thread of its own; the second ends the process.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <future>
#include <thread>

#include "train/run_control.h"

namespace gbmoe {
namespace {

TEST(StopSignals, TheFirstSignalAsksToStop) {
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) {
    StopSignals signals;
    EXPECT_FALSE(stop_requested());
    std::raise(sig);
    EXPECT_TRUE(stop_requested()) << sig;
  }
  StopSignals again;
  EXPECT_FALSE(stop_requested());  // a new run starts without the old request
}

// on_stop runs while the signalled thread is still busy (here: waiting for on_stop itself), as
// the checkpoint of the last completed step is written while a step is under way.
TEST(StopSignals, OnStopRunsAtOnceOnItsOwnThread) {
  for (int sig : {SIGTERM, SIGUSR1}) {
    std::promise<std::thread::id> ran;
    auto on_stop_thread = ran.get_future();
    StopSignals signals([&] { ran.set_value(std::this_thread::get_id()); });
    std::raise(sig);
    ASSERT_EQ(on_stop_thread.wait_for(std::chrono::seconds(20)), std::future_status::ready) << sig;
    EXPECT_NE(on_stop_thread.get(), std::this_thread::get_id());
  }
}

TEST(StopSignals, OnStopRunsOnceOnlyOnAStopAndIsWaitedFor) {
  std::atomic<int> calls{0};
  {
    StopSignals signals([&] { ++calls; });
  }
  EXPECT_EQ(calls, 0);  // no stop: on_stop never runs
  {
    StopSignals signals([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      ++calls;
    });
    request_stop();
    request_stop();
  }  // the destructor waits for the running on_stop
  EXPECT_EQ(calls, 1);
}

TEST(StopSignalsDeathTest, TheSecondSignalStopsAtOnce) {
  EXPECT_EXIT(
      {
        StopSignals signals;
        std::raise(SIGTERM);
        std::raise(SIGUSR1);
        std::exit(0);
      },
      ::testing::KilledBySignal(SIGUSR1), "a second signal stops at once");
}

}  // namespace
}  // namespace gbmoe
